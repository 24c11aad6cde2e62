//! `m2mhub shadow …`: read a device's shadows, set desired keys, delete a
//! shadow. `set` takes `key=value` pairs (the value parsed as JSON when it
//! is JSON, else kept as a string; `key=null` deletes the key; dotted keys
//! nest: `mode.fan=auto`) or a whole desired document with `--doc`.

use super::{fields, text, time_text, Conn};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Map, Value};

#[derive(Subcommand, Debug)]
pub enum ShadowCmd {
    /// The names of a device's shadows ("" is the classic one).
    List {
        #[arg(value_name = "DEVICE")]
        device: String,
    },
    /// A shadow: desired, reported, delta, version.
    Get {
        #[arg(value_name = "DEVICE")]
        device: String,
        /// A named shadow (default: the classic one).
        #[arg(long)]
        name: Option<String>,
    },
    /// Merge keys into the desired state; the device is told the delta.
    Set {
        #[arg(value_name = "DEVICE")]
        device: String,
        /// `key=value` pairs (JSON values; `null` deletes; `a.b=1` nests).
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// The desired document as JSON instead of pairs.
        #[arg(long, value_name = "JSON", conflicts_with = "pairs")]
        doc: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Only if the shadow is still at this version (else 409).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Set desired keys in the shadows of every device a group, label or
    /// profile selects (the whole tenant without one); each is told.
    SetFleet {
        /// `key=value` pairs (as for `set`).
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        #[arg(long, value_name = "JSON", conflicts_with = "pairs")]
        doc: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// `key=value` or `key`.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// A named shadow (default: the classic one).
        #[arg(long)]
        name: Option<String>,
    },
    /// Fleet-wide settings and how many devices have reported them (one
    /// setting with its pending devices when an id is given).
    Settings {
        #[arg(value_name = "SETTING")]
        id: Option<String>,
    },
    /// Delete a shadow.
    Delete {
        #[arg(value_name = "DEVICE")]
        device: String,
        #[arg(long)]
        name: Option<String>,
    },
}

fn path(device: &str, name: &Option<String>) -> String {
    match name {
        Some(n) => format!("/api/v1/devices/{device}/shadow/{n}"),
        None => format!("/api/v1/devices/{device}/shadow"),
    }
}

/// `["mode.fan=auto", "setpoint=21"]` → `{"mode": {"fan": "auto"}, "setpoint": 21}`.
pub fn desired_of(pairs: &[String]) -> Result<Value> {
    if pairs.is_empty() {
        bail!("give at least one key=value (or --doc '{{…}}')");
    }
    let mut root = Map::new();
    for p in pairs {
        let Some((key, raw)) = p.split_once('=') else {
            bail!("{p:?} is not key=value (e.g. setpoint=21, mode.fan=auto, old_key=null)");
        };
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|k| k.is_empty()) {
            bail!("{key:?}: empty key segment");
        }
        let mut at = &mut root;
        for k in &parts[..parts.len() - 1] {
            let slot = at
                .entry(k.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                bail!("{key:?}: {k} is set to a value and also nested");
            }
            at = slot.as_object_mut().context("an object")?;
        }
        at.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(Value::Object(root))
}

pub async fn shadow(conn: &Conn, cmd: ShadowCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        ShadowCmd::List { device } => {
            let v = c
                .get(&format!("/api/v1/devices/{device}/shadows"))
                .await?
                .ok()?;
            if j {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for n in v["items"].as_array().into_iter().flatten() {
                    match n.as_str() {
                        Some("") => println!("(classic)"),
                        Some(n) => println!("{n}"),
                        None => {}
                    }
                }
            }
        }
        ShadowCmd::Get { device, name } => {
            let v = c.get(&path(&device, &name)).await?.ok()?;
            print_shadow(&v, j)?;
        }
        ShadowCmd::Set {
            device,
            pairs,
            doc,
            name,
            version,
        } => {
            let desired = match doc {
                Some(d) => serde_json::from_str(&d).context("--doc is not JSON")?,
                None => desired_of(&pairs)?,
            };
            let mut body = json!({"state": {"desired": desired}});
            if let Some(v) = version {
                body["version"] = json!(v);
            }
            let v = c.patch(&path(&device, &name), &body).await?.ok()?;
            print_shadow(&v, j)?;
        }
        ShadowCmd::SetFleet {
            pairs,
            doc,
            group,
            label,
            profile,
            tenant,
            name,
        } => {
            let state = match doc {
                Some(d) => serde_json::from_str(&d).context("--doc is not JSON")?,
                None => desired_of(&pairs)?,
            };
            let mut body = json!({"state": state});
            for (k, v) in [
                ("group", group),
                ("label", label),
                ("profile", profile),
                ("tenant", tenant),
                ("shadow", name),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let v = c.post("/api/v1/settings", &body).await?.ok()?;
            print_setting(&v, j)?;
        }
        ShadowCmd::Settings { id: Some(id) } => {
            let v = c
                .get(&format!("/api/v1/settings/{}", super::enc(&id)))
                .await?
                .ok()?;
            print_setting(&v, j)?;
        }
        ShadowCmd::Settings { id: None } => {
            let v = c.get("/api/v1/settings").await?.ok()?;
            if j {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for s in v["items"].as_array().into_iter().flatten() {
                    let p = &s["progress"];
                    println!(
                        "{}  {}  {}  reported {} of {}",
                        s["id"].as_str().unwrap_or("?"),
                        time_text(&s["created_ms"]),
                        s["state"],
                        p["reported"],
                        p["targeted"]
                    );
                }
            }
        }
        ShadowCmd::Delete { device, name } => {
            c.delete(&path(&device, &name)).await?.ok()?;
            if !j {
                println!("deleted");
            }
        }
    }
    Ok(())
}

fn print_setting(v: &Value, j: bool) -> Result<()> {
    if j {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let p = &v["progress"];
    let pending: Vec<&str> = p["pending_devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    fields(&[
        ("setting", text(&v["id"])),
        ("state", v["state"].to_string()),
        ("targeted", text(&p["targeted"])),
        ("reported", text(&p["reported"])),
        ("pending", text(&p["pending"])),
        ("failed", text(&p["failed"])),
        (
            "pending devices",
            if pending.is_empty() {
                "-".into()
            } else {
                pending.join(", ")
            },
        ),
    ]);
    Ok(())
}

fn print_shadow(v: &Value, j: bool) -> Result<()> {
    if j {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let name = match v["name"].as_str() {
        Some("") | None => "(classic)".to_string(),
        Some(n) => n.to_string(),
    };
    fields(&[
        ("shadow", name),
        ("version", text(&v["version"])),
        ("updated", time_text(&v["timestamp_ms"])),
        ("desired", v["state"]["desired"].to_string()),
        ("reported", v["state"]["reported"].to_string()),
        (
            "delta",
            v["state"].get("delta").map_or("-".into(), Value::to_string),
        ),
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_become_a_nested_desired_document() {
        let d = desired_of(&[
            "setpoint=21".into(),
            "mode.fan=auto".into(),
            "mode.eco=true".into(),
            "old=null".into(),
            "label=north wing".into(),
        ])
        .expect("pairs");
        assert_eq!(
            d,
            json!({"setpoint": 21, "mode": {"fan": "auto", "eco": true}, "old": null, "label": "north wing"})
        );
        assert!(desired_of(&["novalue".into()]).is_err());
        assert!(desired_of(&["a=1".into(), "a.b=2".into()]).is_err());
        assert!(desired_of(&[]).is_err());
    }
}
