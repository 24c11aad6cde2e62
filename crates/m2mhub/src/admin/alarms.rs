//! `m2mhub alarm …`: alarms raised by rules (or by hand), newest first and
//! paged backwards with `--before`; acknowledge and clear them, and count
//! the active ones by severity.
//!
//! Filters are checked by clap before any request (a status or severity
//! the server would refuse is a usage error naming its flag).

use super::{fields, query, table, text, time_text, Conn};
use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

const SEVERITIES: [&str; 5] = ["critical", "major", "minor", "warning", "info"];

#[derive(Subcommand, Debug)]
pub enum AlarmCmd {
    /// Alarms, active and cleared, newest first.
    List(ListArgs),
    /// One alarm: its details, who acknowledged or cleared it.
    Show {
        #[arg(value_name = "ID")]
        id: u64,
    },
    /// Acknowledge an alarm: it stays active until cleared.
    Ack {
        #[arg(value_name = "ID")]
        id: u64,
    },
    /// Clear an active alarm by hand.
    Clear {
        #[arg(value_name = "ID")]
        id: u64,
    },
    /// Active alarms by severity.
    Summary {
        /// One tenant's (platform users; default: all).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["active", "cleared"]))]
    status: Option<String>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(SEVERITIES))]
    severity: Option<String>,
    /// Only this device's alarms.
    #[arg(long)]
    device: Option<String>,
    /// Only alarms of this type (e.g. overheating).
    #[arg(long = "type", value_name = "TYPE")]
    alarm_type: Option<String>,
    /// Platform users: only this tenant's alarms.
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    limit: u64,
    /// Only alarms older than this id (the next page).
    #[arg(long, value_name = "ID")]
    before: Option<u64>,
}

pub async fn alarm(conn: &Conn, cmd: AlarmCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        AlarmCmd::List(a) => {
            let q = query(&[
                ("status", a.status),
                ("severity", a.severity),
                ("device", a.device),
                ("type", a.alarm_type),
                ("tenant", a.tenant),
                ("limit", Some(a.limit.to_string())),
                ("before", a.before.map(|b| b.to_string())),
            ]);
            let v = c.get(&format!("/api/v1/alarms{q}")).await?.ok()?;
            if j {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let items: Vec<Value> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    json!({
                        "id": a["id"], "device": a["device_id"], "type": a["type"],
                        "severity": a["severity"], "status": a["status"],
                        "acked": a["acked"], "count": a["count"],
                        "raised": time_text(&a["created_ms"]),
                    })
                })
                .collect();
            table(
                &json!({ "items": items }),
                false,
                &[
                    "id", "device", "type", "severity", "status", "acked", "count", "raised",
                ],
            );
            if let Some(next) = v["next"].as_u64() {
                println!("(more: --before {next})");
            }
        }
        AlarmCmd::Show { id } => {
            let v = c.get(&format!("/api/v1/alarms/{id}")).await?.ok()?;
            print_alarm(&v, j)?;
        }
        AlarmCmd::Ack { id } => {
            let v = c
                .post(&format!("/api/v1/alarms/{id}/ack"), &json!({}))
                .await?
                .ok()?;
            if j {
                print_alarm(&v, true)?;
            } else {
                println!(
                    "acknowledged alarm {id} ({} on {}); it stays active until cleared",
                    text(&v["type"]),
                    text(&v["device_id"])
                );
            }
        }
        AlarmCmd::Clear { id } => {
            let v = c
                .post(&format!("/api/v1/alarms/{id}/clear"), &json!({}))
                .await?
                .ok()?;
            if j {
                print_alarm(&v, true)?;
            } else {
                println!(
                    "cleared alarm {id} ({} on {})",
                    text(&v["type"]),
                    text(&v["device_id"])
                );
            }
        }
        AlarmCmd::Summary { tenant } => {
            let v = c
                .get(&format!(
                    "/api/v1/alarms/summary{}",
                    query(&[("tenant", tenant)])
                ))
                .await?
                .ok()?;
            if j {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows: Vec<(&str, String)> =
                SEVERITIES.iter().map(|s| (*s, text(&v[*s]))).collect();
            rows.push(("total active", text(&v["total"])));
            rows.push(("unacknowledged", text(&v["unacked"])));
            if let Some(t) = v["tenant"].as_str() {
                println!("active alarms of tenant {t}:");
            }
            fields(&rows);
        }
    }
    Ok(())
}

fn print_alarm(v: &Value, j: bool) -> Result<()> {
    if j {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let acked = if v["acked"].as_bool() == Some(true) {
        format!(
            "by {} at {}",
            text(&v["acked_by"]),
            time_text(&v["acked_ms"])
        )
    } else {
        "no".into()
    };
    let cleared = if v["cleared_ms"].is_null() {
        "-".into()
    } else {
        format!(
            "at {} by {}",
            time_text(&v["cleared_ms"]),
            text(&v["cleared_by"])
        )
    };
    fields(&[
        ("id", text(&v["id"])),
        ("tenant", text(&v["tenant"])),
        ("device", text(&v["device_id"])),
        ("type", text(&v["type"])),
        ("severity", text(&v["severity"])),
        ("status", text(&v["status"])),
        ("acknowledged", acked),
        ("raised", time_text(&v["created_ms"])),
        (
            "last raised",
            format!(
                "{} ({} times)",
                time_text(&v["updated_ms"]),
                text(&v["count"])
            ),
        ),
        ("cleared", cleared),
        ("rule", text(&v["rule_id"])),
        ("details", text(&v["details"])),
    ]);
    Ok(())
}
