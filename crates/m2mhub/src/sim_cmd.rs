//! `m2mhub sim`: provision a simulated fleet by claim token, as real devices
//! do, and drive it over MQTT (the signals live in `m2mhub_sim::fleet`).
//!
//! Credentials obtained are kept in `<state dir>/<profile>.json`, so a rerun
//! drives the same devices and provisions only the missing ones.

use anyhow::{bail, Context, Result};
use clap::Args;
use m2mhub::client::{write_owner_only, ApiClient, Profile as CliProfile};
use m2mhub_sim::fleet::{self, DeviceCredential, FleetOptions, FleetStats, Profile};
use mqtt_codec::Protocol;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Kind of device: factory, meter, truck, wearable or soil.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["factory", "meter", "truck", "wearable", "soil"]))]
    profile: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// MQTT broker, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// Reporting interval, e.g. 5s, 200ms, 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    interval: Duration,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Seed of the simulated signals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Claim token to provision new devices with (else one is created with
    /// the admin access of --token).
    #[arg(long, env = "M2MHUB_CLAIM_TOKEN", hide_env_values = true)]
    claim_token: Option<String>,
    /// Where the devices' credentials are kept between runs.
    #[arg(long, default_value = "./m2mhub-sim")]
    state_dir: PathBuf,
    /// Speak MQTT 3.1.1 instead of 5.
    #[arg(long)]
    v311: bool,
    /// Share of firmware installs that fail (0 to 1), to see a campaign abort.
    #[arg(long, default_value_t = 0.0)]
    ota_failure_rate: f64,
    /// Share of firmware downloads cut half way and resumed with Range.
    #[arg(long, default_value_t = 0.2)]
    ota_interrupt_rate: f64,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
    #[command(flatten)]
    conn: m2mhub::admin::Conn,
}

/// `5s`, `200ms`, `2m`, `1h`, or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 5s, 200ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (ms, s, m or h)")),
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(args: SimArgs, env: &[(String, String)]) -> Result<i32> {
    let profile: Profile = args.profile.parse()?;
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    for (flag, v) in [
        ("--ota-failure-rate", args.ota_failure_rate),
        ("--ota-interrupt-rate", args.ota_interrupt_rate),
    ] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{flag} must be between 0 and 1, not {v}");
        }
    }
    let devices = provision(&args, profile, env).await?;
    // The firmware key devices pin: fetched once, as a device would have
    // it burnt in at the factory.
    let public_key = match pinned_key(&args.conn, env).await {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("sim: warning: firmware signatures will not be checked: {e:#}");
            None
        }
    };
    eprintln!(
        "sim: {} {} devices, reporting every {:?} to {}",
        devices.len(),
        profile,
        args.interval,
        args.mqtt
    );
    let opts = FleetOptions {
        host: args.mqtt.clone(),
        profile,
        interval: args.interval,
        seed: args.seed,
        protocol: if args.v311 {
            Protocol::V311
        } else {
            Protocol::V5
        },
        ota: m2mhub_sim::ota::OtaOptions {
            public_key,
            failure_rate: args.ota_failure_rate,
            interrupt_rate: args.ota_interrupt_rate,
        },
    };
    let stats = Arc::new(FleetStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let fleet = tokio::spawn(fleet::run(devices.clone(), opts, stats.clone(), stop_rx));
    let progress = (args.progress_secs > 0)
        .then(|| tokio::spawn(progress(stats.clone(), devices.len(), args.progress_secs)));
    let until = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = until => {}
        _ = tokio::signal::ctrl_c() => eprintln!("sim: interrupted"),
    }
    let _ = stop_tx.send(true);
    let report = fleet.await.context("the fleet task failed")?;
    if let Some(p) = progress {
        p.abort();
    }
    eprintln!(
        "sim: done: {} readings published, {} commands answered, {} connection errors",
        report.published, report.commands, report.connection_errors
    );
    if report.published == 0 && report.connection_errors > 0 {
        bail!(
            "no device could publish: {}",
            stats.last_error().unwrap_or_default()
        );
    }
    Ok(0)
}

/// The platform's firmware public key, from `/api/v1/ota/public-key`.
async fn pinned_key(conn: &m2mhub::admin::Conn, env: &[(String, String)]) -> Result<Vec<u8>> {
    use base64::Engine;
    let api = api_client(conn, env)?;
    let v = api
        .get("/api/v1/ota/public-key")
        .await?
        .ok()
        .context("cannot read the firmware public key")?;
    let key = v["publicKey"]
        .as_str()
        .context("the answer has no publicKey")?;
    Ok(base64::engine::general_purpose::STANDARD.decode(key)?)
}

async fn progress(stats: Arc<FleetStats>, total: usize, every: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let published = stats.published.load(Ordering::Relaxed);
        let errors = stats.connection_errors.load(Ordering::Relaxed);
        let mut line = format!(
            "sim: {}/{} connected, {:.1} msg/s, {} published, {} commands",
            stats.connected.load(Ordering::Relaxed),
            total,
            (published - last) as f64 / every as f64,
            published,
            stats.commands.load(Ordering::Relaxed),
        );
        if errors > 0 {
            line.push_str(&format!(
                ", {errors} connection errors (last: {})",
                stats.last_error().unwrap_or_default()
            ));
        }
        eprintln!("{line}");
        last = published;
    }
}

pub(crate) fn state_file(dir: &Path, profile: Profile) -> PathBuf {
    dir.join(format!("{profile}.json"))
}

pub(crate) fn load_state(path: &Path) -> Result<Vec<DeviceCredential>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a fleet state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save_state(path: &Path, devices: &[DeviceCredential]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_owner_only(path, &serde_json::to_string_pretty(devices)?)
}

/// The API client: flags and environment, then the `m2mhub login` profile.
fn api_client(conn: &m2mhub::admin::Conn, env: &[(String, String)]) -> Result<ApiClient> {
    let saved = match CliProfile::path(env) {
        Some(p) => CliProfile::load(&p)?,
        None => CliProfile::default(),
    };
    let server = conn
        .server
        .clone()
        .or(saved.server)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    ApiClient::new(
        &server,
        conn.token.clone().or(saved.token),
        conn.ca_file.as_deref().or(saved.ca_file.as_deref()),
    )
}

/// The devices of this run: those kept from earlier runs, plus new ones
/// provisioned with a claim token until there are `--count`.
async fn provision(
    args: &SimArgs,
    profile: Profile,
    env: &[(String, String)],
) -> Result<Vec<DeviceCredential>> {
    let path = state_file(&args.state_dir, profile);
    let mut devices = load_state(&path)?;
    if devices.len() >= args.count {
        devices.truncate(args.count);
        return Ok(devices);
    }
    let missing = args.count - devices.len();
    let api = Arc::new(api_client(&args.conn, env)?);
    let claim = match &args.claim_token {
        Some(t) => t.clone(),
        None => {
            if args.conn.token.is_none() && CliProfile::path(env).is_none() {
                bail!("{missing} devices to provision: pass --claim-token, or admin access (--token / `m2mhub login`) to create one");
            }
            let body = json!({
                "name": format!("m2mhub sim {profile}"),
                "max_uses": missing,
                "expires_ms": null,
            });
            let v = api
                .post("/api/v1/claim-tokens", &body)
                .await?
                .ok()
                .context(
                    "cannot create a claim token (pass --claim-token, or an operator's --token)",
                )?;
            v["secret"]
                .as_str()
                .context("the claim-token answer has no secret")?
                .to_string()
        }
    };
    eprintln!("sim: provisioning {missing} {profile} devices");
    provision_by_claim(api, &claim, profile, &path, &mut devices, args.count).await?;
    Ok(devices)
}

/// Provision `profile` devices with the claim token `claim` until
/// `devices` holds `count`, saving them to `path` after each batch.
pub(crate) async fn provision_by_claim(
    api: Arc<ApiClient>,
    claim: &str,
    profile: Profile,
    path: &Path,
    devices: &mut Vec<DeviceCredential>,
    count: usize,
) -> Result<()> {
    let mut next = devices.len();
    while devices.len() < count {
        // A few at a time; the state is saved after each batch, so an
        // interrupted run keeps what it got.
        let batch = (count - devices.len()).min(16);
        let mut tasks = tokio::task::JoinSet::new();
        for i in next..next + batch {
            let api = api.clone();
            let body = json!({"claim_token": claim, "name": format!("sim {profile} {}", i + 1)});
            tasks.spawn(async move { api.post("/api/v1/provision", &body).await });
        }
        next += batch;
        let mut failure = None;
        while let Some(r) = tasks.join_next().await {
            match r.context("provisioning task failed")?.and_then(|r| r.ok()) {
                Ok(v) => match (v["username"].as_str(), v["token"].as_str()) {
                    (Some(id), Some(token)) => devices.push(DeviceCredential {
                        device_id: id.to_string(),
                        token: token.to_string(),
                    }),
                    _ => failure = Some(anyhow::anyhow!("provisioning gave no token: {v}")),
                },
                Err(e) => failure = Some(e),
            }
        }
        save_state(path, devices)?;
        if let Some(e) = failure {
            return Err(e.context(format!(
                "provisioning failed after {} devices (kept in {})",
                devices.len(),
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
