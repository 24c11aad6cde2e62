//! `m2mhub demo`: the whole platform in one command, for a first look.
//!
//! It starts the server in-process on a demo data directory, puts one
//! device group per simulated profile, installs three example rules
//! (overheating machines, trucks leaving their geofence, silent meters),
//! provisions the devices by claim token over HTTP exactly as `m2mhub sim`
//! does (one claim token per profile, naming the profile's group), drives
//! them over MQTT with their own tokens, and prints where to look.
//!
//! The data directory is marked as a demo directory. A rerun on it reuses
//! everything (devices, rules, the administrator account); any other
//! non-empty directory is refused, so the demo never writes into a real
//! installation's data. Since the administrator's password is shown only
//! once by the server, the demo keeps it in `admin-login.txt` (owner-only)
//! in its directory, to print it again on later runs.

use crate::sim_cmd;
use anyhow::{bail, Context, Result};
use clap::Args;
use m2mhub::client::{write_owner_only, ApiClient};
use m2mhub::server::Server;
use m2mhub::settings::Settings;
use m2mhub_api::RuleService;
use m2mhub_fleet::NewRule;
use m2mhub_identity::{ClaimSpec, RegistryError, DEFAULT_TENANT};
use m2mhub_sim::fleet::{self, DeviceCredential, FleetOptions, FleetReport, FleetStats, Profile};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The file that marks a directory as the demo's.
const MARKER: &str = "M2MHUB-DEMO";
/// Where the first start's administrator login is kept.
const ADMIN_FILE: &str = "admin-login.txt";
/// The devices' credentials, one file per profile (as `m2mhub sim` keeps them).
const FLEET_DIR: &str = "demo-fleet";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the demo's data; created, or reused if an earlier demo
    /// made it. Any other non-empty folder is refused.
    #[arg(long, default_value = "./m2mhub-demo")]
    data_dir: PathBuf,
    /// MQTT listener, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// MQTT over TLS listener, HOST:PORT (certificate from the built-in CA).
    #[arg(long, default_value = "127.0.0.1:8883")]
    mqtts_listen: String,
    /// HTTP listener (console and API), HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// HTTPS listener (console, API and HTTP devices), HOST:PORT; "" for none.
    #[arg(long, default_value = "127.0.0.1:8443")]
    https_listen: String,
    /// CoAPS (DTLS-PSK) listener, HOST:PORT; "" for none.
    #[arg(long, default_value = "127.0.0.1:5684")]
    coaps_listen: String,
    /// Simulated devices per profile (five profiles).
    #[arg(long, default_value_t = 60)]
    count: usize,
    /// Reporting interval of every device, e.g. 5s, 200ms.
    #[arg(long, default_value = "5s", value_parser = sim_cmd::parse_duration)]
    interval: Duration,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = sim_cmd::parse_duration)]
    duration: Option<Duration>,
}

/// The area the trucks are expected to stay in, `(lon, lat)` corners. The
/// simulated trucks drive loops around depots scattered up to 0.3° of
/// latitude and 0.4° of longitude from central Munich (`fleet.rs`); this
/// box stops a little short of that area's edges, so the loops of depots
/// near an edge cross it now and then (a few depots lie outside it).
const GEOFENCE: &str = "POLYGON((11.20 47.85, 11.95 47.85, 11.95 48.42, 11.20 48.42, 11.20 47.85))";

/// The example rules: `(id, name, description, SQL, actions)`.
fn example_rules() -> Vec<(&'static str, &'static str, &'static str, String, Value)> {
    vec![
        (
            "demo-overheating",
            "Machine overheating",
            "Factory machines: critical alarm and shutdown when hot for 30 s or vibrating hard.",
            // Only machines report vibration: without the WHERE, every other
            // device's reading would count as a failure of the rule.
            "SELECT device, avg(temperature) AS t FROM 'devices/+/telemetry' \
             WHERE vibration IS NOT NULL \
             GROUP BY device, TUMBLING(10s) \
             HAVING avg(temperature) > 85 FOR 30s OR max(vibration) > 7 \
             CLEAR WHEN avg(temperature) < 75"
                .to_string(),
            json!([
                {"type": "alarm", "alarm_type": "overheating", "severity": "critical"},
                {"type": "command", "name": "shutdown", "params": {"reason": "overheating"}}
            ]),
        ),
        (
            "demo-truck-geofence",
            "Truck left its area",
            "Trucks: major alarm when a position is outside the service area.",
            format!(
                "SELECT device, lat, lon FROM 'devices/+/telemetry' \
                 WHERE lat IS NOT NULL AND lon IS NOT NULL AND NOT inside(lat, lon, '{GEOFENCE}')"
            ),
            json!([{"type": "alarm", "alarm_type": "geofence", "severity": "major"}]),
        ),
        (
            "demo-meter-silent",
            "Meter silent",
            "Meters: warning alarm when one has sent nothing for 30 minutes.",
            "SELECT device, last_seen() FROM 'devices/+/telemetry' \
             WHERE energy_kwh IS NOT NULL \
             GROUP BY device HAVING silent(30m)"
                .to_string(),
            json!([{"type": "alarm", "alarm_type": "silent", "severity": "warning"}]),
        ),
    ]
}

pub fn main(args: DemoArgs) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("m2mhub demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("m2mhub demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Warnings only, unless RUST_LOG says otherwise: the demo's own lines are
/// what a newcomer should read.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Make `dir` the demo's, or refuse it. Returns whether an earlier demo
/// made it.
fn claim_dir(dir: &Path) -> Result<bool> {
    if dir.join(MARKER).is_file() {
        return Ok(true);
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} exists and is not a demo directory (no {MARKER} file): choose another with --data-dir",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "Data of `m2mhub demo`: reused by the next `m2mhub demo` run; delete the folder to start afresh.\n",
    )
    .with_context(|| format!("cannot write {}", dir.join(MARKER).display()))?;
    Ok(false)
}

fn settings(args: &DemoArgs) -> Result<m2mhub::settings::Validated> {
    let mut s = Settings {
        data_dir: args.data_dir.clone(),
        ..Default::default()
    };
    s.mqtt.listen = args.mqtt_listen.clone();
    s.mqtt.tls_listen = args.mqtts_listen.clone();
    s.http.listen = args.http_listen.clone();
    s.http.tls_listen = args.https_listen.clone();
    s.coap.dtls_listen = args.coaps_listen.clone();
    // Every simulated device connects from this machine: the per-address
    // limits meant for the internet would refuse most of them.
    s.mqtt.max_connections_per_ip = 0;
    s.mqtt.max_connect_rate_per_ip = 0;
    s.validate()
}

async fn run(args: DemoArgs) -> Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let reused = claim_dir(&args.data_dir)?;
    let validated = settings(&args)?;
    let server = Server::start(&validated).await?;
    let admin = admin_login(&server, &args.data_dir)?;
    install_groups_and_rules(&server)?;

    let http = format!("http://{}", server.http_addr);
    let api = Arc::new(ApiClient::new(&http, None, None)?);
    let mut fleets = Vec::new();
    for profile in Profile::ALL {
        let devices = provision(&server, api.clone(), &args.data_dir, profile, args.count).await?;
        fleets.push((profile, devices));
    }

    if let Err(e) = demo_campaign(&server) {
        eprintln!("demo: no firmware campaign: {e:#}");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut all_stats = Vec::new();
    for (profile, devices) in &fleets {
        let stats = Arc::new(FleetStats::default());
        let opts = FleetOptions {
            host: server.mqtt_addr.to_string(),
            profile: *profile,
            interval: args.interval,
            seed: 1,
            protocol: mqtt_codec::Protocol::V5,
            ota: m2mhub_sim::ota::OtaOptions {
                public_key: Some(server.ota.signer.public_key().to_vec()),
                failure_rate: 0.0,
                interrupt_rate: 0.2,
            },
        };
        tasks.push(tokio::spawn(fleet::run(
            devices.clone(),
            opts,
            stats.clone(),
            stop_rx.clone(),
        )));
        all_stats.push(stats);
    }
    let total = fleets.iter().map(|(_, d)| d.len()).sum::<usize>();
    print_banner(&server, &args, &admin, total, reused);

    let progress = tokio::spawn(progress(server.fleet.clone(), all_stats, total));
    let until = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => wait_for_signal().await,
        }
    };
    tokio::select! {
        _ = until => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("demo: stopping");
    progress.abort();
    let _ = stop_tx.send(true);
    let mut report = FleetReport::default();
    for t in tasks {
        let r = t.await.context("a fleet task failed")?;
        report.published += r.published;
        report.commands += r.commands;
        report.connection_errors += r.connection_errors;
    }
    server.shutdown().await;
    eprintln!(
        "demo: done: {} readings published, {} commands answered; the data stays in {} for the next run",
        report.published,
        report.commands,
        args.data_dir.display()
    );
    Ok(())
}

/// The administrator's `(user, password)`: created on the first start and
/// saved, read back on later ones (`None` if the file was removed).
fn admin_login(server: &Server, dir: &Path) -> Result<Option<(String, String)>> {
    let path = dir.join(ADMIN_FILE);
    if let Some((user, password)) = &server.first_admin {
        write_owner_only(&path, &format!("{user}\n{password}\n"))?;
        return Ok(Some((user.clone(), password.clone())));
    }
    Ok(std::fs::read_to_string(&path).ok().and_then(|text| {
        let mut lines = text.lines();
        Some((lines.next()?.to_string(), lines.next()?.to_string()))
    }))
}

/// One group per profile and the example rules, unless an earlier run made
/// them. Rules are checked by the rule service, as the API does, and then
/// handed to it.
fn install_groups_and_rules(server: &Server) -> Result<()> {
    let reg = &server.registry;
    let fleet = &server.fleet;
    for profile in Profile::ALL {
        let name = format!("Simulated {profile} devices");
        match reg.create_group(DEFAULT_TENANT, profile.name(), &name) {
            Ok(_) | Err(RegistryError::AlreadyExists(_)) => {}
            Err(e) => return Err(e).context(format!("cannot create the group {profile}")),
        }
    }
    for (id, name, description, sql, actions) in example_rules() {
        if fleet.get_rule(id).is_ok() {
            continue;
        }
        server
            .automation
            .validate(DEFAULT_TENANT, &sql, &actions)
            .map_err(|p| anyhow::anyhow!("example rule {id} is invalid: {}", p.message))?;
        fleet
            .create_rule(
                DEFAULT_TENANT,
                NewRule {
                    id: Some(id.into()),
                    name: Some(name.into()),
                    description: description.into(),
                    sql,
                    actions,
                    enabled: true,
                },
            )
            .with_context(|| format!("cannot create the example rule {id}"))?;
        server.automation.reload(id);
    }
    Ok(())
}

/// On the first run: a small firmware image for the meters, signed by the
/// platform, rolled out in two waves half a minute apart, so the OTA page
/// has something to show.
fn demo_campaign(server: &Server) -> Result<()> {
    const NAME: &str = "meter-firmware";
    let fleet = &server.fleet;
    if fleet.list_artifacts(None).iter().any(|a| a.name == NAME) {
        return Ok(());
    }
    let files = &server.ota.service.files;
    let tmp = files.incoming();
    // 256 KiB of deterministic bytes stand in for an image.
    let mut image = Vec::with_capacity(256 * 1024);
    let mut x: u32 = 0x2545_f491;
    while image.len() < 256 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&tmp, &image).with_context(|| format!("cannot write {}", tmp.display()))?;
    let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &image)
        .as_ref()
        .try_into()?;
    use base64::Engine;
    let artifact = m2mhub_fleet::Artifact {
        id: fleet.new_artifact_id(),
        tenant: DEFAULT_TENANT.into(),
        name: NAME.into(),
        version: "1.1.0".into(),
        hardware: None,
        profile: None,
        size: image.len() as u64,
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        signature: base64::engine::general_purpose::STANDARD
            .encode(server.ota.signer.sign_digest(&digest)),
        signed_by: m2mhub_fleet::SignedBy::Platform,
        created_ms: now_ms(),
        created_by: "demo".into(),
    };
    files.commit(&tmp, &artifact.id)?;
    let artifact = fleet.add_artifact(artifact)?;
    fleet.create_campaign(
        DEFAULT_TENANT,
        m2mhub_fleet::NewCampaign {
            name: Some("Meter firmware 1.1.0".into()),
            artifact: artifact.id,
            selector: m2mhub_fleet::Selector {
                group: Some(Profile::Meter.name().into()),
                ..Default::default()
            },
            waves: vec![
                m2mhub_fleet::WaveSize::Percent(50.0),
                m2mhub_fleet::WaveSize::Percent(50.0),
            ],
            wave_wait_s: 30,
            ..Default::default()
        },
        "demo",
        now_ms(),
    )?;
    Ok(())
}

/// `count` devices of `profile`: those of earlier runs, plus new ones
/// provisioned over HTTP with a claim token for the profile's group.
async fn provision(
    server: &Server,
    api: Arc<ApiClient>,
    dir: &Path,
    profile: Profile,
    count: usize,
) -> Result<Vec<DeviceCredential>> {
    let path = sim_cmd::state_file(&dir.join(FLEET_DIR), profile);
    let mut devices = sim_cmd::load_state(&path)?;
    if devices.len() < count {
        let missing = count - devices.len();
        eprintln!("demo: provisioning {missing} {profile} devices");
        let (_, claim) = server
            .registry
            .create_claim_token(ClaimSpec {
                name: format!("demo {profile}"),
                tenant: DEFAULT_TENANT.into(),
                group: Some(profile.name().into()),
                profile: None,
                max_uses: u32::try_from(missing).context("--count is too large")?,
                // Only for this run's provisioning.
                expires_ms: Some(now_ms() + 3_600_000),
            })
            .context("cannot create a claim token")?;
        sim_cmd::provision_by_claim(api, &claim, profile, &path, &mut devices, count).await?;
    }
    devices.truncate(count);
    Ok(devices)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn print_banner(
    server: &Server,
    args: &DemoArgs,
    admin: &Option<(String, String)>,
    total: usize,
    reused: bool,
) {
    let http = format!("http://{}", server.http_addr);
    let (user, password) = match admin {
        Some((u, p)) => (u.as_str(), p.as_str()),
        None => (
            "admin",
            "(shown at the first run; delete the demo folder to start afresh)",
        ),
    };
    println!(
        "m2mhub demo: {total} simulated devices ({} each of factory, meter, truck, wearable, soil) report every {:?}{}",
        args.count,
        args.interval,
        if reused { " (reusing the earlier demo's data)" } else { "" }
    );
    println!("  console:  {http}/");
    println!("  user:     {user}");
    println!("  password: {password}");
    println!(
        "            (kept in {})",
        args.data_dir.join(ADMIN_FILE).display()
    );
    println!(
        "  mqtt:     {} (devices log in with their own tokens; anonymous access is off)",
        server.mqtt_addr
    );
    println!("  rules:    overheating (critical alarm + shutdown), truck outside geofence (major), meter silent 30 min (warning)");
    println!("  groups:   factory, meter, truck, wearable, soil");
    println!("  try:      m2mhub login --server {http} --user {user}");
    println!("            m2mhub device list, then m2mhub query latest <device id>");
    println!(
        "m2mhub ready mqtt={} mqtts={} http={} ws=ws://{}/mqtt https={}",
        server.mqtt_addr,
        server
            .mqtts_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        server.http_addr,
        server.http_addr,
        server
            .https_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    println!("Ctrl-C to stop.");
    let _ = std::io::stdout().flush();
}

/// A line on stderr every 10 s: connections, rate, active alarms.
async fn progress(fleet: m2mhub_fleet::Fleet, stats: Vec<Arc<FleetStats>>, total: usize) {
    const EVERY: u64 = 10;
    let mut tick = tokio::time::interval(Duration::from_secs(EVERY));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let sum = |f: fn(&FleetStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
        let published = sum(|s| s.published.load(Ordering::Relaxed));
        let alarms = fleet.alarm_counts(None);
        eprintln!(
            "demo: {}/{total} connected, {:.1} msg/s, {published} published, {} commands answered, {} active alarms ({} critical, {} major, {} warning)",
            sum(|s| s.connected.load(Ordering::Relaxed)),
            (published - last) as f64 / EVERY as f64,
            sum(|s| s.commands.load(Ordering::Relaxed)),
            alarms.total,
            alarms.critical,
            alarms.major,
            alarms.warning,
        );
        last = published;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}
