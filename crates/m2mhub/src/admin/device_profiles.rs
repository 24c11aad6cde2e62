//! `m2mhub profile …` (device profiles: the payload content type of a kind
//! of device), `m2mhub device set-profile` and `m2mhub device events`.

use super::{enc, query, show, table, Conn};
use crate::client::ApiClient;
use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    /// List device profiles (of one tenant with --tenant).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Create a device profile.
    Add {
        name: String,
        /// Payload content type: application/json, application/senml+json,
        /// application/senml+cbor, application/cbor or text/plain (absent:
        /// the ingest detects the format).
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One profile.
    Show {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Change a profile (devices using it follow at once). `default` can be
    /// set too: it then applies to every device without another profile.
    Set {
        name: String,
        #[arg(long, conflicts_with = "clear_content_type")]
        content_type: Option<String>,
        /// Remove the content type (the ingest detects the format).
        #[arg(long)]
        clear_content_type: bool,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete a profile no device or claim token uses.
    Delete {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
}

const COLUMNS: [&str; 4] = ["tenant", "name", "content_type", "description"];

fn profile_path(name: &str, tenant: Option<String>) -> String {
    format!(
        "/api/v1/profiles/{}{}",
        enc(name),
        query(&[("tenant", tenant)])
    )
}

pub async fn profile(conn: &Conn, cmd: ProfileCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        ProfileCmd::List { tenant } => {
            let v = c
                .get(&format!("/api/v1/profiles{}", query(&[("tenant", tenant)])))
                .await?
                .ok()?;
            table(&v, j, &COLUMNS);
        }
        ProfileCmd::Add {
            name,
            content_type,
            description,
            tenant,
        } => {
            let body = json!({
                "name": name, "tenant": tenant, "content_type": content_type,
                "description": description.unwrap_or_default(),
            });
            show(&c.post("/api/v1/profiles", &body).await?.ok()?, j);
        }
        ProfileCmd::Show { name, tenant } => {
            show(&c.get(&profile_path(&name, tenant)).await?.ok()?, j);
        }
        ProfileCmd::Set {
            name,
            content_type,
            clear_content_type,
            description,
            tenant,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(ct) = content_type {
                body.insert("content_type".into(), json!(ct));
            } else if clear_content_type {
                body.insert("content_type".into(), Value::Null);
            }
            if let Some(d) = description {
                body.insert("description".into(), json!(d));
            }
            if body.is_empty() {
                bail!(
                    "nothing to change: give --content-type, --clear-content-type or --description"
                );
            }
            let v = c
                .request(
                    "PUT",
                    &profile_path(&name, tenant),
                    Some(&Value::Object(body)),
                )
                .await?
                .ok()?;
            show(&v, j);
        }
        ProfileCmd::Delete { name, tenant } => {
            c.delete(&profile_path(&name, tenant)).await?.ok()?;
            if !j {
                println!("deleted profile {name}");
            }
        }
    }
    Ok(())
}

/// `device set-profile`: the profile must exist in the device's tenant (or
/// be `default`).
pub(super) async fn set_profile(c: &ApiClient, j: bool, id: &str, profile: &str) -> Result<()> {
    let v = c
        .patch(
            &format!("/api/v1/devices/{}", enc(id)),
            &json!({ "profile": profile }),
        )
        .await?
        .ok()?;
    show(&v, j);
    Ok(())
}

/// `device events`: newest first, with the exact counts under the table.
pub(super) async fn events(
    c: &ApiClient,
    j: bool,
    id: &str,
    kind: Option<String>,
    limit: usize,
    before: Option<u64>,
) -> Result<()> {
    let q = query(&[
        ("kind", kind),
        ("limit", Some(limit.to_string())),
        ("before", before.map(|b| b.to_string())),
    ]);
    let v = c
        .get(&format!("/api/v1/devices/{}/events{q}", enc(id)))
        .await?
        .ok()?;
    table(&v, j, &["id", "ts_ms", "kind", "detail"]);
    if !j {
        if let Some(next) = v.get("next").and_then(Value::as_u64) {
            println!("(more: --before {next})");
        }
        let n = |k: &str| v["counts"][k].as_u64().unwrap_or(0);
        println!(
            "since the server started: {} recorded, {} stored, {} suppressed by the rate limit, {} dropped",
            n("recorded"),
            n("queued"),
            n("suppressed"),
            n("dropped")
        );
    }
    Ok(())
}
