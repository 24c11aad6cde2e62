//! `m2mhub`: the command line. Thin by design — parsing and wiring only;
//! everything else lives in the library crates.
#![forbid(unsafe_code)]

mod demo;
mod sim_cmd;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use m2mhub::admin;
use m2mhub::server::Server;
use m2mhub::settings::{Settings, DEFAULT_CONFIG};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc instead of the system allocator: fewer bytes per idle
/// connection (1,546 vs 1,692) and ~10% more QoS 1 throughput in the same
/// run (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for invalid configuration (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "m2mhub",
    version,
    about = "One-binary machine-to-machine platform: MQTT broker, device data and rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the platform (MQTT, MQTT over TLS and WebSocket, HTTP).
    Serve(ServeArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a password-file line for USER (password read from stdin).
    Passwd {
        user: String,
        /// The password; read from the first line of stdin when absent.
        #[arg(long)]
        password: Option<String>,
    },
    /// Load generator: measure any MQTT broker (this one or another).
    Bench(BenchArgs),
    /// CoAP load: SenML+CBOR readings over plain CoAP or CoAPS (CON or
    /// NON), or the DTLS-PSK handshake rate (--handshakes).
    BenchCoap(BenchCoapArgs),
    /// Simulated fleet: provision devices by claim token and drive them
    /// over MQTT with realistic signals, obeying commands.
    Sim(sim_cmd::SimArgs),
    /// The whole platform with a few hundred simulated devices of every
    /// profile and example rules, on a demo data directory.
    Demo(demo::DemoArgs),
    /// Log in to a server and save the API token in the CLI profile.
    Login {
        #[arg(long, default_value = "admin")]
        user: String,
        /// Read from stdin when absent.
        #[arg(long)]
        password: Option<String>,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Devices and their credentials.
    Device {
        #[command(subcommand)]
        cmd: admin::DeviceCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Fleet-provisioning claim tokens.
    Claim {
        #[command(subcommand)]
        cmd: admin::ClaimCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Operator accounts.
    User {
        #[command(subcommand)]
        cmd: admin::UserCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        cmd: admin::AuditCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Security events and bans.
    Security {
        #[command(subcommand)]
        cmd: admin::SecurityCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Tenants and device groups.
    Tenant {
        #[command(subcommand)]
        cmd: admin::TenantCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Authorization policies.
    Policy {
        #[command(subcommand)]
        cmd: admin::PolicyCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Device profiles: the payload content type of a kind of device.
    Profile {
        #[command(subcommand)]
        cmd: admin::ProfileCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Telemetry: latest values, series, raw points, aggregates, CSV
    /// export, retention rules (`query retention set`) and store figures.
    Query {
        #[command(subcommand)]
        cmd: admin::QueryCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Rules: SQL over the message stream with actions (alarms, commands,
    /// webhooks…), and how often each fired.
    Rule {
        #[command(subcommand)]
        cmd: admin::RuleCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Alarms: list, acknowledge, clear, count by severity.
    Alarm {
        #[command(subcommand)]
        cmd: admin::AlarmCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Device shadows: read them, set desired keys, delete them.
    Shadow {
        #[command(subcommand)]
        cmd: admin::ShadowCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// OTA firmware: upload images, run campaigns in waves, watch them.
    Ota {
        #[command(subcommand)]
        cmd: admin::OtaCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Device commands: send one (and wait for the answer), follow them.
    #[command(name = "command")]
    DeviceCommands {
        #[command(subcommand)]
        cmd: admin::CommandCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Diagnostic bundles: ask a device for one, list, download, delete.
    Diagnostics {
        #[command(subcommand)]
        cmd: admin::DiagnosticsCmd,
        #[command(flatten)]
        conn: admin::Conn,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the commented default configuration.
    Default,
    /// Load and validate a configuration (file, environment), print the result.
    Check {
        #[arg(long, env = "M2MHUB_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (see `m2mhub config default`).
    #[arg(long, env = "M2MHUB_CONFIG")]
    config: Option<PathBuf>,
    /// Folder for all data (default ./m2mhub-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// MQTT listener, HOST:PORT (default 0.0.0.0:1883).
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// MQTT over TLS listener, HOST:PORT (default 0.0.0.0:8883; needs --tls-cert and --tls-key).
    #[arg(long)]
    mqtts_listen: Option<String>,
    /// HTTP listener, HOST:PORT (default 0.0.0.0:8080).
    #[arg(long)]
    http_listen: Option<String>,
    /// HTTPS listener, HOST:PORT (default 0.0.0.0:8443; "" for none).
    #[arg(long)]
    https_listen: Option<String>,
    /// Plain CoAP listener (UDP), HOST:PORT (default: none).
    #[arg(long)]
    coap_listen: Option<String>,
    /// CoAPS (DTLS-PSK) listener (UDP), HOST:PORT (default 0.0.0.0:5684; "" for none).
    #[arg(long)]
    coaps_listen: Option<String>,
    /// Server certificate chain (PEM) for MQTT over TLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for MQTT over TLS.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM) on the TLS listener.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Accept clients without credentials (off by default).
    #[arg(long)]
    allow_anonymous: bool,
    /// Password file written with `m2mhub passwd`.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Join a cluster of m2mhub nodes through NATS (see `[cluster]`).
    #[arg(long)]
    cluster: bool,
    /// NATS server URL(s) for the cluster, comma-separated.
    #[arg(long)]
    nats_url: Option<String>,
    /// This node's name in the cluster (default: made on first start, kept in the data folder).
    #[arg(long)]
    node_id: Option<String>,
    /// Keep the registry and fleet metadata in this PostgreSQL server
    /// (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite.
    #[arg(long)]
    postgres_url: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// Broker address HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    host: String,
    /// Fan-in, fan-out, pairs: subscribers connect here instead of --host
    /// (another node of a cluster: the cost of crossing it).
    #[arg(long)]
    sub_host: Option<String>,
    /// fan-in, fan-out, pairs, idle, connect (connection rate), telemetry
    /// (devices publishing 10-metric JSON readings), or command-latency
    /// (hot/cold readings; time from a hot reading to the rule's command),
    /// or shadow (registered devices publish shadow updates; updates/s and
    /// the time to each one's `…/update/accepted`).
    #[arg(
        long,
        default_value = "fan-in",
        value_parser = clap::builder::PossibleValuesParser::new(["fan-in", "fan-out", "pairs", "idle", "connect", "telemetry", "command-latency", "shadow"])
    )]
    scenario: String,
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Connections for the idle and connect scenarios.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Idle / connect: connection attempts in flight at most.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Idle / connect: spread connections over 127.0.0.1 … 127.0.0.N (one
    /// source address reaches a port only ~28,000 times).
    #[arg(long, default_value_t = 1)]
    source_ips: usize,
    /// Connect: then drop all connections at once and reconnect all at once.
    #[arg(long)]
    reconnect_storm: bool,
    /// Idle / connect: file with one `client_id username password` line per
    /// connection (`-` for none).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Idle / connect: PEM CA to verify the broker; enables TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name to verify in the broker's certificate (default localhost).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Mutual TLS: directory with <client_id>.pem and <client_id>.key.
    #[arg(long)]
    tls_client_certs: Option<PathBuf>,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes (at least 16: a timestamp and a sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Total publish rate in messages/s (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// QoS 1/2 in-flight window per publisher (shadow: unanswered updates
    /// per device).
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Use MQTT 5 (default 3.1.1).
    #[arg(long)]
    v5: bool,
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// PID of the broker, to report its memory per connection.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Telemetry, command-latency, shadow: device id (= client id) prefix;
    /// device i is <prefix><i>.
    #[arg(long, default_value = "bench-dev-")]
    device_prefix: String,
    /// Telemetry: the server's /metrics URL, to report stored points/s.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Command latency: every Nth reading of a device is hot (at least 2).
    #[arg(long, default_value_t = 2)]
    hot_every: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config { command } => config_command(command),
        Command::Passwd { user, password } => passwd(&user, password),
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench(args),
        Command::BenchCoap(args) => bench_coap(args),
        Command::Sim(args) => run_admin(|env| async move { sim_cmd::run(args, &env).await }),
        Command::Demo(args) => demo::main(args),
        Command::Login {
            user,
            password,
            conn,
        } => run_admin(
            |env| async move { admin::login(&conn, &user, password, &env).await.map(|_| 0) },
        ),
        Command::Device { cmd, conn } => {
            run_admin(|env| async move { admin::device(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Claim { cmd, conn } => {
            run_admin(|env| async move { admin::claim(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::User { cmd, conn } => {
            run_admin(|env| async move { admin::user(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Audit { cmd, conn } => {
            run_admin(|env| async move { admin::audit(&conn, cmd, &env).await })
        }
        Command::Security { cmd, conn } => {
            run_admin(|env| async move { admin::security(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Tenant { cmd, conn } => {
            run_admin(|env| async move { admin::tenant(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Policy { cmd, conn } => {
            run_admin(|env| async move { admin::policy(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Profile { cmd, conn } => {
            run_admin(|env| async move { admin::profile(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Query { cmd, conn } => {
            run_admin(
                |env| async move { admin::query_telemetry(&conn, cmd, &env).await.map(|_| 0) },
            )
        }
        Command::Rule { cmd, conn } => {
            run_admin(|env| async move { admin::rule(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Alarm { cmd, conn } => {
            run_admin(|env| async move { admin::alarm(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Shadow { cmd, conn } => {
            run_admin(|env| async move { admin::shadow(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::Ota { cmd, conn } => {
            run_admin(|env| async move { admin::ota(&conn, cmd, &env).await.map(|_| 0) })
        }
        Command::DeviceCommands { cmd, conn } => {
            run_admin(|env| async move { admin::command(&conn, cmd, &env).await })
        }
        Command::Diagnostics { cmd, conn } => {
            run_admin(|env| async move { admin::diagnostics(&conn, cmd, &env).await })
        }
    }
}

/// Run one operator command on a small runtime; errors print as
/// `m2mhub: <reason>` and exit 1 (2 for a usage error).
fn run_admin<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(Vec<(String, String)>) -> Fut,
    Fut: std::future::Future<Output = Result<i32>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("m2mhub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f(process_env())) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("m2mhub: {e:#}");
            if e.is::<admin::UsageError>() {
                ExitCode::from(admin::EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

fn config_command(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Default => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        ConfigCommand::Check { config } => {
            match Settings::load(config.as_deref(), &process_env()).and_then(|s| {
                s.validate()?;
                Ok(s)
            }) {
                Ok(mut s) => {
                    // Printed without the database password.
                    s.storage.postgres_url = s.storage.shown_url();
                    // The effective configuration, but not the secret in it.
                    if !s.reports.smtp_password.is_empty() {
                        s.reports.smtp_password = "<redacted>".into();
                    }
                    print!("{}", toml::to_string(&s).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("m2mhub: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

fn passwd(user: &str, password: Option<String>) -> ExitCode {
    if user.is_empty() || user.contains(':') {
        eprintln!("m2mhub: the user name must be non-empty and must not contain ':'");
        return ExitCode::from(2);
    }
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line).is_err() || line.trim_end().is_empty() {
                eprintln!("m2mhub: give the password with --password or on stdin");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    println!(
        "{}",
        m2mhub_broker::auth::hash_password_line(user, &password)
    );
    ExitCode::SUCCESS
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match load_serve_settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("m2mhub: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&settings.log_level, settings.log_json);
    if let Some((before, after)) = m2mhub::fd_limit::raise().filter(|(b, a)| a > b) {
        tracing::info!(
            before,
            after,
            "open-file limit (connections): soft limit raised to the hard limit"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("m2mhub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_server(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("m2mhub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_serve_settings(args: &ServeArgs) -> Result<m2mhub::settings::Validated> {
    let mut s = Settings::load(args.config.as_deref(), &process_env())?;
    if let Some(d) = &args.data_dir {
        s.data_dir = d.clone();
    }
    if let Some(a) = &args.mqtt_listen {
        s.mqtt.listen = a.clone();
    }
    if let Some(a) = &args.mqtts_listen {
        s.mqtt.tls_listen = a.clone();
    }
    if let Some(a) = &args.http_listen {
        s.http.listen = a.clone();
    }
    if let Some(a) = &args.https_listen {
        s.http.tls_listen = a.clone();
    }
    if let Some(a) = &args.coap_listen {
        s.coap.listen = a.clone();
    }
    if let Some(a) = &args.coaps_listen {
        s.coap.dtls_listen = a.clone();
    }
    let path = |p: &PathBuf| p.display().to_string();
    if let Some(p) = &args.tls_cert {
        s.mqtt.tls_cert = path(p);
    }
    if let Some(p) = &args.tls_key {
        s.mqtt.tls_key = path(p);
    }
    if let Some(p) = &args.tls_client_ca {
        s.mqtt.tls_client_ca = path(p);
    }
    if args.allow_anonymous {
        s.mqtt.allow_anonymous = true;
    }
    if let Some(p) = &args.password_file {
        s.mqtt.password_file = path(p);
    }
    if args.cluster {
        s.cluster.enabled = true;
    }
    if let Some(u) = &args.nats_url {
        s.cluster.nats_url = u.clone();
    }
    if let Some(n) = &args.node_id {
        s.cluster.node_id = n.clone();
    }
    if let Some(u) = &args.postgres_url {
        s.storage.postgres_url = u.clone();
    }
    s.validate()
}

fn init_logging(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},hyper=warn,tower=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run_server(settings: m2mhub::settings::Validated) -> Result<()> {
    let server = Server::start(&settings).await?;
    if let Some((user, password)) = &server.first_admin {
        // Shown once: only its Argon2id hash is stored.
        println!("m2mhub: created the administrator account (shown once, keep it safe):");
        println!("  user:     {user}");
        println!("  password: {password}");
        println!(
            "  log in:   m2mhub login --server http://{} --user {user}",
            server.http_addr
        );
    }
    tracing::info!(data_dir = %settings.data_dir.display(), "m2mhub started");
    // One machine-readable line on stdout, for scripts and tests.
    println!(
        "m2mhub ready mqtt={} mqtts={} http={} ws=ws://{}/mqtt https={} coap={} coaps={}",
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
        server
            .coap_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        server
            .coaps_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    let _ = std::io::stdout().flush();
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
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
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[derive(clap::Args)]
struct BenchCoapArgs {
    /// CoAP or CoAPS server address HOST:PORT.
    #[arg(long)]
    target: std::net::SocketAddr,
    /// Plain CoAP: the device id (its token secret in --secret).
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    secret: Option<String>,
    /// CoAPS: the PSK identity (its key, hex, in --psk-key).
    #[arg(long)]
    psk_identity: Option<String>,
    #[arg(long)]
    psk_key: Option<String>,
    /// Concurrent clients (one request in flight each).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Non-confirmable requests.
    #[arg(long)]
    non: bool,
    /// Measure full DTLS handshakes per second instead (needs the PSK).
    #[arg(long)]
    handshakes: bool,
    /// Plain CoAP POSTs to this path with no credentials (e.g. a peer
    /// CoAP server's resource).
    #[arg(long)]
    path: Option<String>,
}

fn bench_coap(args: BenchCoapArgs) -> ExitCode {
    use m2mhub_sim::coap_load::{self, CoapAuth, CoapLoad};
    let psk = match (&args.psk_identity, &args.psk_key) {
        (Some(i), Some(k)) => match hex_bytes(k) {
            Some(key) => Some((i.as_bytes().to_vec(), key)),
            None => {
                eprintln!("m2mhub bench-coap: --psk-key must be hex");
                return ExitCode::from(2);
            }
        },
        (None, None) => None,
        _ => {
            eprintln!("m2mhub bench-coap: give --psk-identity and --psk-key together");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("m2mhub bench-coap: {e}");
            return ExitCode::FAILURE;
        }
    };
    let duration = Duration::from_secs_f64(args.duration);
    let out = rt.block_on(async {
        if args.handshakes {
            let Some((identity, key)) = psk else {
                return Err("--handshakes needs --psk-identity and --psk-key".to_string());
            };
            let r =
                coap_load::handshakes(args.target, identity, key, args.clients, duration).await?;
            return serde_json::to_string(&r).map_err(|e| e.to_string());
        }
        let auth = match (psk, args.device, args.secret) {
            _ if args.path.is_some() => CoapAuth::Path(args.path.clone().unwrap_or_default()),
            (Some((identity, key)), _, _) => CoapAuth::Psk { identity, key },
            (None, Some(device), Some(secret)) => CoapAuth::Token { device, secret },
            _ => {
                return Err(
                    "give --device and --secret (CoAP) or --psk-identity and --psk-key (CoAPS)"
                        .to_string(),
                )
            }
        };
        let r = coap_load::run(CoapLoad {
            target: args.target,
            auth,
            clients: args.clients,
            duration,
            non: args.non,
        })
        .await?;
        serde_json::to_string(&r).map_err(|e| e.to_string())
    });
    match out {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("m2mhub bench-coap: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn bench(args: BenchArgs) -> ExitCode {
    use m2mhub_sim::{BenchOptions, Scenario};
    // Each connection is a descriptor here too.
    let _ = m2mhub::fd_limit::raise();
    let scenario = match args.scenario.parse::<Scenario>() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("m2mhub bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = BenchOptions {
        host: args.host,
        sub_host: args.sub_host,
        scenario,
        publishers: args.publishers,
        subscribers: args.subscribers,
        connections: args.connections,
        concurrency: args.concurrency,
        source_ips: args.source_ips,
        reconnect_storm: args.reconnect_storm,
        credentials: args.credentials,
        tls_ca: args.tls_ca,
        tls_server_name: args.tls_server_name,
        tls_client_certs: args.tls_client_certs,
        qos: args.qos,
        payload_size: args.payload,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        rate: args.rate,
        inflight: args.inflight,
        protocol_v5: args.v5,
        username: args.username,
        password: args.password,
        broker_pid: args.broker_pid,
        device_prefix: args.device_prefix,
        metrics_url: args.metrics_url,
        hot_every: args.hot_every,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("m2mhub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(m2mhub_sim::run(opts)) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("m2mhub bench: {e}");
            ExitCode::FAILURE
        }
    }
}
