//! `m2mhub ota …`: firmware artifacts (upload, list, show, delete) and
//! campaigns (create, list, show with progress, pause, resume, cancel).

use super::{enc, query, show, table, Conn};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum OtaCmd {
    /// Firmware images.
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Roll-outs of an image to a fleet.
    #[command(subcommand)]
    Campaign(CampaignCmd),
    /// The Ed25519 public key devices pin to verify images.
    PublicKey,
}

#[derive(Subcommand, Debug)]
pub enum ArtifactCmd {
    /// Upload an image (streamed); the platform hashes and signs it.
    Upload {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        hardware: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// An external Ed25519 signature of the image's SHA-256 (base64).
        #[arg(long)]
        signature: Option<String>,
        /// The external signer's public key (base64), checked at upload.
        #[arg(long, requires = "signature")]
        public_key: Option<String>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Show {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Delete an image (refused while a campaign uses it).
    Delete {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CampaignCmd {
    /// Start rolling an artifact out.
    Create {
        #[arg(long)]
        artifact: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// `key=value` or `key`.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        /// Explicit devices, comma-separated.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// Wave sizes, comma-separated: `10%` or a count (`5,20%,100%`);
        /// the rest joins the last wave.
        #[arg(long, value_delimiter = ',')]
        waves: Vec<String>,
        /// Seconds from one wave's start to the next's, at least.
        #[arg(long, default_value_t = 0)]
        wave_wait: u64,
        /// Devices told per minute at most.
        #[arg(long)]
        max_starts_per_minute: Option<u32>,
        /// Abort when a wave's failures exceed this share (0..1).
        #[arg(long)]
        failure_threshold: Option<f64>,
        /// A job with no report for this many seconds fails.
        #[arg(long)]
        job_timeout: Option<u64>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// A campaign's progress: jobs by state, per wave, failures.
    Show {
        #[arg(value_name = "ID")]
        id: String,
    },
    Pause {
        #[arg(value_name = "ID")]
        id: String,
    },
    Resume {
        #[arg(value_name = "ID")]
        id: String,
    },
    Cancel {
        #[arg(value_name = "ID")]
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `10%` → `{"percent": 10}`, `5` → `{"count": 5}`.
pub fn wave_of(s: &str) -> Result<Value> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("wave {s:?}: not a percentage (like 10%)"))?;
        return Ok(json!({"percent": p}));
    }
    match s.parse::<usize>() {
        Ok(n) => Ok(json!({"count": n})),
        Err(_) => bail!("wave {s:?}: give a count (5) or a percentage (10%)"),
    }
}

pub async fn ota(conn: &Conn, cmd: OtaCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        OtaCmd::PublicKey => {
            let v = c.get("/api/v1/ota/public-key").await?.ok()?;
            if j {
                show(&v, true);
            } else {
                println!("{}", v["publicKey"].as_str().unwrap_or_default());
            }
        }
        OtaCmd::Artifact(ArtifactCmd::Upload {
            file,
            name,
            version,
            hardware,
            profile,
            tenant,
            signature,
            public_key,
        }) => {
            if !file.is_file() {
                bail!("{} is not a file", file.display());
            }
            let q = query(&[
                ("name", Some(name)),
                ("version", Some(version)),
                ("hardware", hardware),
                ("profile", profile),
                ("tenant", tenant),
                ("signature", signature),
                ("public_key", public_key),
            ]);
            let v = c
                .upload(&format!("/api/v1/ota/artifacts{q}"), &file)
                .await?
                .ok()?;
            show(&v, j);
        }
        OtaCmd::Artifact(ArtifactCmd::List { tenant }) => {
            let v = c
                .get(&format!(
                    "/api/v1/ota/artifacts{}",
                    query(&[("tenant", tenant)])
                ))
                .await?
                .ok()?;
            table(
                &v,
                j,
                &["id", "tenant", "name", "version", "size", "signed_by"],
            );
        }
        OtaCmd::Artifact(ArtifactCmd::Show { id }) => {
            let v = c
                .get(&format!("/api/v1/ota/artifacts/{}", enc(&id)))
                .await?
                .ok()?;
            show(&v, j);
        }
        OtaCmd::Artifact(ArtifactCmd::Delete { id }) => {
            c.delete(&format!("/api/v1/ota/artifacts/{}", enc(&id)))
                .await?
                .ok()?;
            if !j {
                println!("deleted");
            }
        }
        OtaCmd::Campaign(CampaignCmd::Create {
            artifact,
            name,
            tenant,
            group,
            label,
            profile,
            devices,
            waves,
            wave_wait,
            max_starts_per_minute,
            failure_threshold,
            job_timeout,
        }) => {
            let waves = waves
                .iter()
                .map(|w| wave_of(w))
                .collect::<Result<Vec<_>>>()?;
            let mut body = json!({
                "artifact": artifact,
                "selector": {"group": group, "label": label, "profile": profile},
                "waves": waves,
                "wave_wait_s": wave_wait,
            });
            for (k, v) in [
                ("name", name.map(Value::from)),
                ("tenant", tenant.map(Value::from)),
                ("devices", devices.map(|d| json!(d))),
                (
                    "max_starts_per_minute",
                    max_starts_per_minute.map(Value::from),
                ),
                ("failure_threshold", failure_threshold.map(Value::from)),
                ("job_timeout_s", job_timeout.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let v = c.post("/api/v1/ota/campaigns", &body).await?.ok()?;
            print_campaign(&v, j);
        }
        OtaCmd::Campaign(CampaignCmd::List { tenant }) => {
            let v = c
                .get(&format!(
                    "/api/v1/ota/campaigns{}",
                    query(&[("tenant", tenant)])
                ))
                .await?
                .ok()?;
            table(
                &v,
                j,
                &[
                    "id",
                    "name",
                    "artifact",
                    "status",
                    "waves_started",
                    "waves",
                    "jobs",
                ],
            );
        }
        OtaCmd::Campaign(CampaignCmd::Show { id }) => {
            let v = c
                .get(&format!("/api/v1/ota/campaigns/{}", enc(&id)))
                .await?
                .ok()?;
            print_campaign(&v, j);
        }
        OtaCmd::Campaign(CampaignCmd::Pause { id }) => {
            let v = c
                .post(
                    &format!("/api/v1/ota/campaigns/{}/pause", enc(&id)),
                    &json!({}),
                )
                .await?
                .ok()?;
            print_campaign(&v, j);
        }
        OtaCmd::Campaign(CampaignCmd::Resume { id }) => {
            let v = c
                .post(
                    &format!("/api/v1/ota/campaigns/{}/resume", enc(&id)),
                    &json!({}),
                )
                .await?
                .ok()?;
            print_campaign(&v, j);
        }
        OtaCmd::Campaign(CampaignCmd::Cancel { id, reason }) => {
            let v = c
                .post(
                    &format!("/api/v1/ota/campaigns/{}/cancel", enc(&id)),
                    &json!({"reason": reason}),
                )
                .await?
                .ok()?;
            print_campaign(&v, j);
        }
    }
    Ok(())
}

/// Counts of the states that have any, e.g. `succeeded 40, failed 2`.
fn counts(v: &Value) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn print_campaign(v: &Value, j: bool) {
    if j {
        show(v, true);
        return;
    }
    println!(
        "campaign  {} ({})",
        v["id"].as_str().unwrap_or("?"),
        v["name"].as_str().unwrap_or("")
    );
    println!(
        "artifact  {} {}",
        v["artifact"]["name"].as_str().unwrap_or("?"),
        v["artifact"]["version"].as_str().unwrap_or("")
    );
    let mut status = v["status"].as_str().unwrap_or("?").to_string();
    if let Some(r) = v["reason"].as_str() {
        status.push_str(&format!(" — {r}"));
    }
    println!("status    {status}");
    println!("targets   {}: {}", v["targets"], counts(&v["jobs"]));
    for (i, w) in v["waves"].as_array().into_iter().flatten().enumerate() {
        let started = if w["started_ms"].is_null() {
            "waiting"
        } else {
            "started"
        };
        println!(
            "wave {}    {} devices, {started}: {}",
            i + 1,
            w["size"],
            counts(&w["jobs"])
        );
    }
    for f in v["failures"].as_array().into_iter().flatten() {
        println!(
            "failed    {} (wave {}): {}",
            f["device"].as_str().unwrap_or("?"),
            f["wave"],
            f["reason"].as_str().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_are_counts_or_percentages() {
        assert_eq!(wave_of("10%").unwrap(), json!({"percent": 10.0}));
        assert_eq!(wave_of(" 5 ").unwrap(), json!({"count": 5}));
        assert!(wave_of("ten").is_err());
        assert!(wave_of("x%").is_err());
    }
}
