//! Operator commands of the CLI (`m2mhub device …`, `claim …`, `user …`,
//! `audit …`, `security …`, `tenant …`, `policy …`, `profile …`, `query …`,
//! `rule …`, `alarm …`, `command …`, `diagnostics …`, `login`): each is one or a few calls
//! to `/api/v1` on a running server.
//! Human tables by default, `--json` for scripts.

use crate::client::{ApiClient, Profile};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;

mod alarms;
mod commands;
mod device_profiles;
mod diagnostics;
mod ota;
mod psks;
mod query;
mod rules;
mod shadows;
pub use alarms::{alarm, AlarmCmd};
pub use commands::{command, CommandCmd};
pub use device_profiles::{profile, ProfileCmd};
pub use diagnostics::{diagnostics, DiagnosticsCmd};
pub use ota::{ota, OtaCmd};
pub use psks::PskCmd;
pub use query::{query_telemetry, QueryCmd, RetentionCmd};
pub use rules::{rule, RuleCmd};
pub use shadows::{shadow, ShadowCmd};

/// A command line refused before any request (flags that do not go
/// together, a value the API would refuse): reported with its fix, and
/// with clap's usage exit code, [`EXIT_USAGE`].
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Exit code of usage errors (clap's, and `m2mhub passwd`'s).
pub const EXIT_USAGE: u8 = 2;

/// Where the server is and who we are: flags, then `M2MHUB_SERVER`,
/// `M2MHUB_TOKEN`, `M2MHUB_CA_FILE`, then the profile file written by
/// `m2mhub login`.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Server base address, e.g. http://127.0.0.1:8080.
    #[arg(long, global = true, env = "M2MHUB_SERVER")]
    pub server: Option<String>,
    /// API token (see `m2mhub login`).
    #[arg(long, global = true, env = "M2MHUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate for an https server (the platform CA: <data_dir>/pki/ca.pem).
    #[arg(long, global = true, env = "M2MHUB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    fn client(&self, env: &[(String, String)]) -> Result<ApiClient> {
        let profile = match Profile::path(env) {
            Some(p) => Profile::load(&p)?,
            None => Profile::default(),
        };
        let server = self
            .server
            .clone()
            .or(profile.server)
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let token = self.token.clone().or(profile.token);
        let ca = self.ca_file.clone().or(profile.ca_file);
        ApiClient::new(&server, token, ca.as_deref())
    }
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// List devices.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        /// key=value
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        search: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        after: Option<String>,
    },
    /// Register a device.
    Add {
        /// Device id (generated when absent).
        id: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// One device: metadata, whether it is online, its MQTT session.
    Show { id: String },
    /// Let a disabled device connect again.
    Enable { id: String },
    /// Disable a device: it can no longer connect and its live session is dropped.
    Disable { id: String },
    /// Delete a device and its credentials.
    Delete { id: String },
    /// Give a device another profile (one of its tenant's, or `default`).
    SetProfile { id: String, profile: String },
    /// A device's events (e.g. undecodable payloads), newest first.
    Events {
        id: String,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only events older than this id (paging).
        #[arg(long)]
        before: Option<u64>,
    },
    /// Token credentials.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Certificates from the built-in CA.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// DTLS pre-shared keys for CoAPS.
    Psk {
        #[command(subcommand)]
        cmd: PskCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Issue a token (the secret is printed once).
    Issue {
        id: String,
        /// Seconds until it expires.
        #[arg(long)]
        expires_in: Option<i64>,
    },
    /// A device's token credentials (never the secrets).
    List { id: String },
    /// Revoke a token: live sessions using it are dropped.
    Revoke { id: String, token_id: String },
    /// Expire a token (now, or in --in seconds): the end of a rollover.
    Expire {
        id: String,
        token_id: String,
        #[arg(long = "in")]
        in_secs: Option<i64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Issue a certificate from a CSR file, or with a generated key.
    Issue {
        id: String,
        #[arg(long)]
        csr: Option<PathBuf>,
        #[arg(long)]
        days: Option<u32>,
        /// Write <id>.pem, <id>.key and ca.pem here instead of printing JSON.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// A device's certificates.
    List { id: String },
    /// Revoke a certificate: live sessions using it are dropped, the CRL lists it.
    Revoke { id: String, fingerprint: String },
}

#[derive(Subcommand, Debug)]
pub enum ClaimCmd {
    /// Create a claim token for fleet provisioning (the secret is printed once).
    Create {
        #[arg(long)]
        max_uses: u32,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        /// Seconds until it expires (default 24 h).
        #[arg(long)]
        expires_in: Option<i64>,
    },
    /// Claim tokens, with their uses and expiry.
    List,
    /// Revoke a claim token (devices already provisioned keep their identity).
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create an operator account (password read from stdin unless given).
    Add {
        username: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        password: Option<String>,
    },
    /// Operator accounts.
    List,
    /// Delete an operator account (its API tokens stop working).
    Delete { username: String },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    List {
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        action: Option<String>,
    },
    /// Verify the hash chain: through the server, or offline with --data-dir.
    Verify {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SecurityCmd {
    Events {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Active bans.
    Bans,
    /// Ban an IP address or a client id.
    Ban {
        #[arg(long)]
        ip: Option<String>,
        #[arg(long)]
        client_id: Option<String>,
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a ban.
    Unban { key: String },
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Tenants.
    List,
    /// Create a tenant.
    Add {
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Device groups of a tenant.
    Groups { tenant: String },
    /// Create a device group in a tenant.
    AddGroup {
        tenant: String,
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// A tenant's authorization policies.
    List { tenant: String },
    /// Create or replace a policy: topic filter patterns with {device_id}, {group}, {tenant}.
    Set {
        tenant: String,
        name: String,
        #[arg(long)]
        group: Option<String>,
        #[arg(long = "publish")]
        publish: Vec<String>,
        #[arg(long = "subscribe")]
        subscribe: Vec<String>,
    },
    /// Delete a policy (the subscriptions it allowed are removed).
    Delete { tenant: String, name: String },
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// Print `items` as a table with the given columns, or the JSON.
fn table(v: &Value, json_out: bool, cols: &[&str]) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let empty = Vec::new();
    let items = v.get("items").and_then(|i| i.as_array()).unwrap_or(&empty);
    let cell = |item: &Value, c: &str| -> String {
        match item.get(c) {
            None | Some(Value::Null) => "-".into(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    };
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for it in items {
        for (i, c) in cols.iter().enumerate() {
            widths[i] = widths[i].max(cell(it, c).chars().count().min(60));
        }
    }
    let line = |vals: Vec<String>| {
        let parts: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{:<w$}", v.chars().take(60).collect::<String>(), w = *w))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for it in items {
        line(cols.iter().map(|c| cell(it, c)).collect());
    }
    if let Some(next) = v.get("next").and_then(|n| n.as_str()) {
        println!("(more: --after {next})");
    }
}

fn show(v: &Value, json_out: bool) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    if let Some(map) = v.as_object() {
        let w = map.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in map {
            let text = match val {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("{k:<w$}  {text}");
        }
    } else {
        println!("{v}");
    }
}

/// A value for a human: strings as they are, `-` for null or empty, JSON
/// otherwise.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Epoch milliseconds as RFC 3339 (`-` when absent).
fn time_text(v: &Value) -> String {
    v.as_i64()
        .map(m2mhub_api::telemetry::format_time)
        .unwrap_or_else(|| "-".into())
}

/// `key  value` lines in the given order, values aligned; further lines
/// of a value are indented under its first.
fn fields<K: AsRef<str>>(rows: &[(K, String)]) {
    let w = rows
        .iter()
        .map(|(k, _)| k.as_ref().chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in rows {
        let mut lines = v.lines();
        println!("{:<w$}  {}", k.as_ref(), lines.next().unwrap_or_default());
        for l in lines {
            println!("{:w$}  {l}", "");
        }
    }
}

fn read_secret(prompt: &str) -> Result<String> {
    eprint!("{prompt}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let s = line.trim_end_matches(['\r', '\n']).to_string();
    if s.is_empty() {
        bail!("no password given");
    }
    Ok(s)
}

pub async fn login(
    conn: &Conn,
    user: &str,
    password: Option<String>,
    env: &[(String, String)],
) -> Result<()> {
    let server = conn
        .server
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let password = match password {
        Some(p) => p,
        None => read_secret("password: ")?,
    };
    let client = ApiClient::new(&server, None, conn.ca_file.as_deref())?;
    let v = client
        .post(
            "/api/v1/auth/login",
            &json!({"username": user, "password": password}),
        )
        .await?
        .ok()?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server returned no token"))?
        .to_string();
    let path = Profile::path(env)
        .ok_or_else(|| anyhow!("no HOME: set M2MHUB_PROFILE to where the profile should live"))?;
    Profile {
        server: Some(server),
        token: Some(token),
        ca_file: conn.ca_file.clone(),
    }
    .save(&path)?;
    println!(
        "logged in as {user} ({}); profile saved to {}",
        v["role"].as_str().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

pub async fn device(conn: &Conn, cmd: DeviceCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        DeviceCmd::List {
            tenant,
            group,
            profile,
            label,
            search,
            limit,
            after,
        } => {
            let q = query(&[
                ("tenant", tenant),
                ("group", group),
                ("profile", profile),
                ("label", label),
                ("search", search),
                ("limit", Some(limit.to_string())),
                ("after", after),
            ]);
            let v = c.get(&format!("/api/v1/devices{q}")).await?.ok()?;
            table(
                &v,
                j,
                &[
                    "id", "name", "tenant", "group", "profile", "enabled", "online",
                ],
            );
        }
        DeviceCmd::Add {
            id,
            name,
            tenant,
            group,
            profile,
            labels,
        } => {
            let mut l = serde_json::Map::new();
            for kv in labels {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--label must be key=value, got {kv:?}"))?;
                l.insert(k.to_string(), json!(v));
            }
            let v = c
                .post("/api/v1/devices", &json!({"id": id, "name": name, "tenant": tenant, "group": group, "profile": profile, "labels": l}))
                .await?
                .ok()?;
            show(&v, j);
        }
        DeviceCmd::Show { id } => show(
            &c.get(&format!("/api/v1/devices/{}", enc(&id)))
                .await?
                .ok()?,
            j,
        ),
        DeviceCmd::Enable { id } => {
            let v = c
                .patch(
                    &format!("/api/v1/devices/{}", enc(&id)),
                    &json!({"enabled": true}),
                )
                .await?
                .ok()?;
            show(&v, j);
        }
        DeviceCmd::Disable { id } => {
            let v = c
                .patch(
                    &format!("/api/v1/devices/{}", enc(&id)),
                    &json!({"enabled": false}),
                )
                .await?
                .ok()?;
            show(&v, j);
        }
        DeviceCmd::Delete { id } => {
            c.delete(&format!("/api/v1/devices/{}", enc(&id)))
                .await?
                .ok()?;
            if !j {
                println!("deleted {id}");
            }
        }
        DeviceCmd::SetProfile { id, profile } => {
            device_profiles::set_profile(&c, j, &id, &profile).await?
        }
        DeviceCmd::Events {
            id,
            kind,
            limit,
            before,
        } => device_profiles::events(&c, j, &id, kind, limit, before).await?,
        DeviceCmd::Token { cmd } => match cmd {
            TokenCmd::Issue { id, expires_in } => {
                let body = json!({"expires_ms": expires_in.map(|s| now_ms() + s * 1000)});
                let v = c
                    .post(&format!("/api/v1/devices/{}/tokens", enc(&id)), &body)
                    .await?
                    .ok()?;
                if j {
                    show(&v, true);
                } else {
                    println!("token id: {}", v["token"]["id"].as_str().unwrap_or("?"));
                    println!("secret:   {}", v["secret"].as_str().unwrap_or("?"));
                    println!(
                        "(shown once: connect with username {id} and this secret as password)"
                    );
                }
            }
            TokenCmd::List { id } => {
                let v = c
                    .get(&format!("/api/v1/devices/{}/tokens", enc(&id)))
                    .await?
                    .ok()?;
                table(&v, j, &["id", "created_ms", "expires_ms", "revoked"]);
            }
            TokenCmd::Revoke { id, token_id } => {
                c.delete(&format!(
                    "/api/v1/devices/{}/tokens/{}",
                    enc(&id),
                    enc(&token_id)
                ))
                .await?
                .ok()?;
                if !j {
                    println!("revoked token {token_id} of {id}");
                }
            }
            TokenCmd::Expire {
                id,
                token_id,
                in_secs,
            } => {
                let body = json!({"at_ms": in_secs.map(|s| now_ms() + s * 1000)});
                c.post(
                    &format!(
                        "/api/v1/devices/{}/tokens/{}/expire",
                        enc(&id),
                        enc(&token_id)
                    ),
                    &body,
                )
                .await?
                .ok()?;
                if !j {
                    println!("token {token_id} of {id} expires");
                }
            }
        },
        DeviceCmd::Psk { cmd } => psks::psk(&c, j, cmd).await?,
        DeviceCmd::Cert { cmd } => match cmd {
            CertCmd::Issue {
                id,
                csr,
                days,
                out_dir,
            } => {
                let csr = match csr {
                    Some(p) => Some(
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("cannot read CSR {}", p.display()))?,
                    ),
                    None => None,
                };
                let v = c
                    .post(
                        &format!("/api/v1/devices/{}/certificates", enc(&id)),
                        &json!({"csr": csr, "days": days}),
                    )
                    .await?
                    .ok()?;
                match out_dir {
                    Some(dir) => {
                        std::fs::create_dir_all(&dir)?;
                        std::fs::write(
                            dir.join(format!("{id}.pem")),
                            v["certificate"].as_str().unwrap_or(""),
                        )?;
                        std::fs::write(dir.join("ca.pem"), v["ca"].as_str().unwrap_or(""))?;
                        if let Some(k) = v["private_key"].as_str() {
                            crate::client::write_owner_only(&dir.join(format!("{id}.key")), k)?;
                        }
                        println!(
                            "wrote {}/{id}.pem, ca.pem{}",
                            dir.display(),
                            if v["private_key"].is_string() {
                                format!(", {id}.key")
                            } else {
                                String::new()
                            }
                        );
                        println!("fingerprint {}", v["fingerprint"].as_str().unwrap_or("?"));
                    }
                    None => show(&v, j),
                }
            }
            CertCmd::List { id } => {
                let v = c
                    .get(&format!("/api/v1/devices/{}/certificates", enc(&id)))
                    .await?
                    .ok()?;
                table(
                    &v,
                    j,
                    &["fingerprint", "serial_hex", "not_after_ms", "revoked_ms"],
                );
            }
            CertCmd::Revoke { id, fingerprint } => {
                c.delete(&format!(
                    "/api/v1/devices/{}/certificates/{}",
                    enc(&id),
                    enc(&fingerprint)
                ))
                .await?
                .ok()?;
                if !j {
                    println!("revoked certificate {fingerprint} of {id}");
                }
            }
        },
    }
    Ok(())
}

pub async fn claim(conn: &Conn, cmd: ClaimCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        ClaimCmd::Create {
            max_uses,
            tenant,
            group,
            profile,
            expires_in,
        } => {
            let body = json!({
                "max_uses": max_uses, "tenant": tenant, "group": group, "profile": profile,
                "expires_ms": expires_in.map(|s| now_ms() + s * 1000),
            });
            let v = c.post("/api/v1/claim-tokens", &body).await?.ok()?;
            if j {
                show(&v, true);
            } else {
                println!("claim id: {}", v["claim"]["id"].as_str().unwrap_or("?"));
                println!("secret:   {}", v["secret"].as_str().unwrap_or("?"));
                println!("(shown once: devices POST it to /api/v1/provision or publish it on $provision/<client id>/request)");
            }
        }
        ClaimCmd::List => {
            let v = c.get("/api/v1/claim-tokens").await?.ok()?;
            table(
                &v,
                j,
                &[
                    "id",
                    "tenant",
                    "group",
                    "profile",
                    "uses",
                    "max_uses",
                    "expires_ms",
                    "revoked",
                ],
            );
        }
        ClaimCmd::Revoke { id } => {
            c.delete(&format!("/api/v1/claim-tokens/{}", enc(&id)))
                .await?
                .ok()?;
            if !j {
                println!("revoked claim token {id}");
            }
        }
    }
    Ok(())
}

pub async fn user(conn: &Conn, cmd: UserCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        UserCmd::Add {
            username,
            role,
            tenant,
            password,
        } => {
            let password = match password {
                Some(p) => p,
                None => read_secret("password for the new user: ")?,
            };
            let v = c
                .post("/api/v1/users", &json!({"username": username, "password": password, "role": role, "tenant": tenant}))
                .await?
                .ok()?;
            show(&v, j);
        }
        UserCmd::List => {
            let v = c.get("/api/v1/users").await?.ok()?;
            table(&v, j, &["username", "role", "tenant", "created_ms"]);
        }
        UserCmd::Delete { username } => {
            c.delete(&format!("/api/v1/users/{}", enc(&username)))
                .await?
                .ok()?;
            if !j {
                println!("deleted user {username}");
            }
        }
    }
    Ok(())
}

/// `audit verify --data-dir` works on a stopped server too: it reads the
/// registry file directly.
pub async fn audit(conn: &Conn, cmd: AuditCmd, env: &[(String, String)]) -> Result<i32> {
    let j = conn.json;
    match cmd {
        AuditCmd::Verify {
            data_dir: Some(dir),
        } => {
            let report = m2mhub_identity::Registry::verify_audit_at(&dir.join("registry"))
                .map_err(|e| anyhow!("{e}"))?;
            let v = serde_json::to_value(&report)?;
            show(&v, j);
            return Ok(if v["ok"].as_bool() == Some(true) {
                0
            } else {
                1
            });
        }
        AuditCmd::Verify { data_dir: None } => {
            let c = conn.client(env)?;
            let v = c.get("/api/v1/audit/verify").await?.ok()?;
            show(&v, j);
            return Ok(if v["ok"].as_bool() == Some(true) {
                0
            } else {
                1
            });
        }
        AuditCmd::List {
            after,
            limit,
            actor,
            action,
        } => {
            let c = conn.client(env)?;
            let q = query(&[
                ("after", after.map(|a| a.to_string())),
                ("limit", Some(limit.to_string())),
                ("actor", actor),
                ("action", action),
            ]);
            let v = c.get(&format!("/api/v1/audit{q}")).await?.ok()?;
            table(
                &v,
                j,
                &["seq", "ts_ms", "actor", "action", "target", "outcome"],
            );
        }
    }
    Ok(0)
}

pub async fn security(conn: &Conn, cmd: SecurityCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        SecurityCmd::Events { limit } => {
            let v = c
                .get(&format!("/api/v1/security/events?limit={limit}"))
                .await?
                .ok()?;
            table(&v, j, &["seq", "ts_ms", "kind", "device_id", "addr"]);
        }
        SecurityCmd::Bans => {
            let v = c.get("/api/v1/security/bans").await?.ok()?;
            table(&v, j, &["key", "reason", "remaining_secs", "strikes"]);
        }
        SecurityCmd::Ban {
            ip,
            client_id,
            seconds,
            reason,
        } => {
            c.post(
                "/api/v1/security/bans",
                &json!({"ip": ip, "client_id": client_id, "seconds": seconds, "reason": reason}),
            )
            .await?
            .ok()?;
            if !j {
                println!("banned");
            }
        }
        SecurityCmd::Unban { key } => {
            c.delete(&format!("/api/v1/security/bans/{}", enc(&key)))
                .await?
                .ok()?;
            if !j {
                println!("unbanned {key}");
            }
        }
    }
    Ok(())
}

pub async fn tenant(conn: &Conn, cmd: TenantCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        TenantCmd::List => table(
            &c.get("/api/v1/tenants").await?.ok()?,
            j,
            &["id", "name", "created_ms"],
        ),
        TenantCmd::Add { id, name } => show(
            &c.post("/api/v1/tenants", &json!({"id": id, "name": name}))
                .await?
                .ok()?,
            j,
        ),
        TenantCmd::Groups { tenant } => table(
            &c.get(&format!("/api/v1/tenants/{}/groups", enc(&tenant)))
                .await?
                .ok()?,
            j,
            &["id", "name", "tenant", "created_ms"],
        ),
        TenantCmd::AddGroup { tenant, id, name } => show(
            &c.post(
                &format!("/api/v1/tenants/{}/groups", enc(&tenant)),
                &json!({"id": id, "name": name}),
            )
            .await?
            .ok()?,
            j,
        ),
    }
    Ok(())
}

pub async fn policy(conn: &Conn, cmd: PolicyCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        PolicyCmd::List { tenant } => table(
            &c.get(&format!("/api/v1/tenants/{}/policies", enc(&tenant)))
                .await?
                .ok()?,
            j,
            &["name", "group", "publish", "subscribe"],
        ),
        PolicyCmd::Set {
            tenant,
            name,
            group,
            publish,
            subscribe,
        } => show(
            &c.request(
                "PUT",
                &format!("/api/v1/tenants/{}/policies/{}", enc(&tenant), enc(&name)),
                Some(&json!({"group": group, "publish": publish, "subscribe": subscribe})),
            )
            .await?
            .ok()?,
            j,
        ),
        PolicyCmd::Delete { tenant, name } => {
            c.delete(&format!(
                "/api/v1/tenants/{}/policies/{}",
                enc(&tenant),
                enc(&name)
            ))
            .await?
            .ok()?;
            if !j {
                println!("deleted policy {name}");
            }
        }
    }
    Ok(())
}
