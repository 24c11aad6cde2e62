//! `m2mhub command …`: send a command to a device and follow it.
//!
//! The server records the command and publishes it on
//! `devices/<id>/commands`; the device answers on
//! `devices/<id>/commands/response`. With `--wait`, `command send` polls
//! the command until it is finished (answered, failed or timed out) or its
//! timeout has passed, prints it, and exits 0 only if it was answered.

use super::{enc, fields, query, table, text, time_text, Conn};
use crate::client::ApiClient;
use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::time::Duration;

/// The server's timeout when the request names none.
const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// The server times commands out on a one-second sweep: `--wait` allows it
/// this much longer before giving up on seeing the final status.
const SWEEP_GRACE: Duration = Duration::from_secs(2);

#[derive(Subcommand, Debug)]
pub enum CommandCmd {
    /// Send a command to a device.
    Send(SendArgs),
    /// A device's commands and their status, newest first.
    List {
        device: String,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        /// Only commands older than this one (the next page).
        #[arg(long, value_name = "COMMAND_ID")]
        before: Option<String>,
    },
    /// One command: its status, and the device's response.
    Show { id: String },
}

#[derive(Args, Debug)]
pub struct SendArgs {
    device: String,
    /// What to do, e.g. reboot (1 to 64 of A-Z a-z 0-9 . _ -).
    name: String,
    /// Parameters, any JSON value, e.g. '{"delay": 1}'.
    #[arg(long, value_name = "JSON", value_parser = json_arg)]
    params: Option<Value>,
    /// Seconds the device has to answer (default 30; at most a week).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=7 * 24 * 3600))]
    timeout_secs: Option<u64>,
    /// Wait for the answer (or the timeout) and print it; exit 1 unless the
    /// device answered.
    #[arg(long)]
    wait: bool,
}

fn json_arg(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

/// Exit code 0, or 1 when `--wait` saw the command fail or time out.
pub async fn command(conn: &Conn, cmd: CommandCmd, env: &[(String, String)]) -> Result<i32> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        CommandCmd::Send(a) => return send(&c, j, a).await,
        CommandCmd::List {
            device,
            limit,
            before,
        } => {
            let q = query(&[("limit", Some(limit.to_string())), ("before", before)]);
            let v = c
                .get(&format!("/api/v1/devices/{}/commands{q}", enc(&device)))
                .await?
                .ok()?;
            if j {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let items: Vec<Value> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    json!({
                        "id": c["id"], "name": c["name"], "status": c["status"],
                        "sent": time_text(&c["created_ms"]), "origin": c["origin"],
                    })
                })
                .collect();
            table(
                &json!({ "items": items }),
                false,
                &["id", "name", "status", "sent", "origin"],
            );
            if let Some(next) = v["next"].as_str() {
                println!("(more: --before {next})");
            }
        }
        CommandCmd::Show { id } => {
            let v = c
                .get(&format!("/api/v1/commands/{}", enc(&id)))
                .await?
                .ok()?;
            print_command(&v, j)?;
        }
    }
    Ok(0)
}

async fn send(c: &ApiClient, j: bool, a: SendArgs) -> Result<i32> {
    let body = json!({
        "name": a.name,
        "params": a.params.unwrap_or(Value::Null),
        "timeout_secs": a.timeout_secs,
    });
    let sent = c
        .post(
            &format!("/api/v1/devices/{}/commands", enc(&a.device)),
            &body,
        )
        .await?
        .ok()?;
    if !a.wait {
        print_command(&sent, j)?;
        return Ok(0);
    }
    let id = text(&sent["id"]);
    let timeout_ms = sent["timeout_ms"]
        .as_u64()
        .unwrap_or(a.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS) * 1000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms) + SWEEP_GRACE;
    let mut pause = Duration::from_millis(100);
    let last = loop {
        let v = c
            .get(&format!("/api/v1/commands/{}", enc(&id)))
            .await?
            .ok()?;
        if is_finished(&v) || tokio::time::Instant::now() >= deadline {
            break v;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    };
    print_command(&last, j)?;
    if !is_finished(&last) {
        eprintln!(
            "m2mhub: command {id} is still {} after its timeout ({} s)",
            text(&last["status"]),
            timeout_ms / 1000
        );
    }
    Ok(if last["status"] == "answered" { 0 } else { 1 })
}

fn is_finished(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("answered" | "failed" | "timed_out")
    )
}

fn print_command(v: &Value, j: bool) -> Result<()> {
    if j {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    fields(&[
        ("id", text(&v["id"])),
        ("device", text(&v["device_id"])),
        ("name", text(&v["name"])),
        ("params", text(&v["params"])),
        ("status", text(&v["status"])),
        ("sent", time_text(&v["created_ms"])),
        ("updated", time_text(&v["updated_ms"])),
        (
            "timeout",
            format!("{} s", v["timeout_ms"].as_u64().unwrap_or(0) / 1000),
        ),
        ("origin", text(&v["origin"])),
        ("response", text(&v["response"])),
        ("error", text(&v["error"])),
    ]);
    Ok(())
}
