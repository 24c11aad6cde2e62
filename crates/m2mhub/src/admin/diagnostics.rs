//! `m2mhub diagnostics …`: ask a device for a diagnostic bundle, list its
//! bundles, download one (its SHA-256 checked against the one recorded at
//! upload), delete one.
//!
//! The server sends the device the command `diagnostics.upload` with a
//! one-time URL; the device PUTs the bundle there. With `--wait`,
//! `diagnostics request` polls the request until the upload arrived (or
//! failed, or the URL expired) and exits 0 only if it arrived.

use super::{enc, fields, query, table, text, time_text, Conn};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum DiagnosticsCmd {
    /// Ask a device for a diagnostic bundle.
    Request {
        device: String,
        /// Why (kept with the bundle).
        #[arg(long)]
        reason: Option<String>,
        /// Wait for the upload (or the URL's expiry); exit 1 unless it arrived.
        #[arg(long)]
        wait: bool,
    },
    /// A device's bundles and requests, newest first.
    List {
        device: String,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
    },
    /// One bundle's status, size and SHA-256.
    Show { device: String, bundle: String },
    /// Save an uploaded bundle to a file (default `<device>-<bundle>.bin`;
    /// `-` writes to standard output).
    Download {
        device: String,
        bundle: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Delete a bundle (or a request) and its file.
    Delete { device: String, bundle: String },
}

/// Exit code 0, or 1 when `--wait` saw no upload.
pub async fn diagnostics(
    conn: &Conn,
    cmd: DiagnosticsCmd,
    env: &[(String, String)],
) -> Result<i32> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        DiagnosticsCmd::Request {
            device,
            reason,
            wait,
        } => {
            let base = format!("/api/v1/devices/{}/diagnostics", enc(&device));
            let req = c.post(&base, &json!({ "reason": reason })).await?.ok()?;
            if !wait {
                print_bundle(&req, j)?;
                return Ok(0);
            }
            let path = format!("{base}/{}", enc(&text(&req["id"])));
            let mut pause = Duration::from_millis(200);
            let last = loop {
                let v = c.get(&path).await?.ok()?;
                if v["status"] != "requested" {
                    break v;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            };
            print_bundle(&last, j)?;
            return Ok(if last["status"] == "uploaded" { 0 } else { 1 });
        }
        DiagnosticsCmd::List { device, limit } => {
            let q = query(&[("limit", Some(limit.to_string()))]);
            let v = c
                .get(&format!("/api/v1/devices/{}/diagnostics{q}", enc(&device)))
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
                .map(|b| {
                    json!({
                        "id": b["id"], "status": b["status"], "size": b["size"],
                        "requested": time_text(&b["requested_ms"]),
                        "uploaded": time_text(&b["uploaded_ms"]),
                        "by": b["requested_by"],
                    })
                })
                .collect();
            table(
                &json!({ "items": items }),
                false,
                &["id", "status", "size", "requested", "uploaded", "by"],
            );
        }
        DiagnosticsCmd::Show { device, bundle } => {
            let v = c
                .get(&format!(
                    "/api/v1/devices/{}/diagnostics/{}",
                    enc(&device),
                    enc(&bundle)
                ))
                .await?
                .ok()?;
            print_bundle(&v, j)?;
        }
        DiagnosticsCmd::Download {
            device,
            bundle,
            output,
        } => {
            let path = format!(
                "/api/v1/devices/{}/diagnostics/{}",
                enc(&device),
                enc(&bundle)
            );
            let meta = c.get(&path).await?.ok()?;
            let bytes = c.get_bytes(&format!("{path}/content")).await?;
            let sha = sha256_hex(&bytes);
            if meta["sha256"].as_str() != Some(sha.as_str()) {
                bail!(
                    "the download's SHA-256 {sha} is not the recorded {}; try again",
                    text(&meta["sha256"])
                );
            }
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{device}-{bundle}.bin")));
            if out.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::fs::write(&out, &bytes)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                eprintln!(
                    "saved {} bytes to {} (sha256 {sha})",
                    bytes.len(),
                    out.display()
                );
            }
        }
        DiagnosticsCmd::Delete { device, bundle } => {
            c.delete(&format!(
                "/api/v1/devices/{}/diagnostics/{}",
                enc(&device),
                enc(&bundle)
            ))
            .await?
            .ok()?;
            if !j {
                println!("deleted {bundle}");
            }
        }
    }
    Ok(0)
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn print_bundle(v: &Value, j: bool) -> Result<()> {
    if j {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    fields(&[
        ("id", text(&v["id"])),
        ("device", text(&v["device_id"])),
        ("status", text(&v["status"])),
        ("requested", time_text(&v["requested_ms"])),
        ("by", text(&v["requested_by"])),
        ("reason", text(&v["reason"])),
        ("url expires", time_text(&v["expires_ms"])),
        ("uploaded", time_text(&v["uploaded_ms"])),
        ("size", text(&v["size"])),
        ("sha256", text(&v["sha256"])),
        ("error", text(&v["error"])),
    ]);
    Ok(())
}
