//! Runs the load generator against a real Mosquitto, when one is installed.
//! Skipped (with a note) otherwise; m2mhub's own suite runs it against
//! m2mhub.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use m2mhub_sim::{run, BenchOptions, Scenario};

fn credentials_file(dir: &std::path::Path, n: usize) -> PathBuf {
    let path = dir.join("credentials.txt");
    let text: String = (0..n).map(|i| format!("bench-c-{i} - -\n")).collect();
    std::fs::write(&path, text).expect("write credentials");
    path
}

struct Broker {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn find_mosquitto() -> Option<PathBuf> {
    let candidates = [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("mosquitto"))
                    .find(|p| p.exists())
            })
        })
}

fn start_mosquitto() -> Option<Broker> {
    start_mosquitto_with("allow_anonymous true")
}

fn start_mosquitto_with(auth_conf: &str) -> Option<Broker> {
    let Some(bin) = find_mosquitto() else {
        eprintln!("note: mosquitto not installed, skipping the live benchmark test");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let dir = std::env::temp_dir().join(format!("m2mhub-sim-mosq-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\n{auth_conf}\npersistence false\nmax_queued_messages 100000\n"
        ),
    )
    .expect("write config");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let broker = Broker {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(broker)
}

fn opts(port: u16, scenario: Scenario, qos: u8) -> BenchOptions {
    BenchOptions {
        host: format!("127.0.0.1:{port}"),
        scenario,
        publishers: 2,
        subscribers: 2,
        connections: 20,
        qos,
        payload_size: 64,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        rate: 2000,
        inflight: 64,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_against_mosquitto() {
    let Some(broker) = start_mosquitto() else {
        return;
    };
    let pid = broker.child.id();
    for (scenario, qos, v5) in [
        (Scenario::FanIn, 0, false),
        (Scenario::FanIn, 1, false),
        (Scenario::Pairs, 1, true),
        (Scenario::FanOut, 2, false),
        (Scenario::Pairs, 2, true),
    ] {
        let mut o = opts(broker.port, scenario, qos);
        o.protocol_v5 = v5;
        o.broker_pid = Some(pid);
        let mut r = run(o.clone()).await.expect("bench run");
        println!("{}", r.to_table());
        if r.lost > 0 {
            // Mosquitto under a CPU-starved shared machine (parallel
            // builds) has delayed QoS 2 deliveries past the grace period;
            // one rerun separates that from a real accounting bug.
            eprintln!("{scenario:?} qos {qos}: {} lost; running once more", r.lost);
            r = run(o).await.expect("bench rerun");
            println!("{}", r.to_table());
        }
        assert!(r.sent > 0, "{scenario:?} qos {qos}: nothing sent");
        // 2000 msg/s for 0.3 s: ~600, give or take scheduling.
        assert!(
            r.sent >= 300 && r.sent <= 800,
            "{scenario:?}: paced sent = {}",
            r.sent
        );
        assert_eq!(r.lost, 0, "{scenario:?} qos {qos}: lost messages");
        assert_eq!(r.received, r.expected);
        assert!(r.latency_p50_us > 0.0 && r.latency_max_us >= r.latency_p99_us);
        assert!(r.broker_rss_before_kb.is_some());
    }

    // Unpaced.
    let mut o = opts(broker.port, Scenario::FanIn, 1);
    o.rate = 0;
    let r = run(o).await.expect("unpaced run");
    println!("{}", r.to_table());
    assert!(r.sent > 0);
    assert_eq!(r.lost, 0);

    // Idle connections.
    let mut o = opts(broker.port, Scenario::Idle, 0);
    o.duration = Duration::ZERO;
    o.broker_pid = Some(pid);
    let r = run(o).await.expect("idle run");
    println!("{}", r.to_table());
    assert_eq!(r.connections, 20);
    assert!(r.bytes_per_connection.is_some());
}

#[tokio::test]
async fn connection_refused_is_reported() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut o = opts(port, Scenario::FanIn, 0);
    o.duration = Duration::from_millis(10);
    let err = run(o).await.expect_err("nothing listens there");
    assert!(
        matches!(err, m2mhub_sim::BenchError::Connect { .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_against_mosquitto() {
    let Some(broker) = start_mosquitto() else {
        return;
    };
    let creds = credentials_file(&broker._dir, 200);
    let mut o = opts(broker.port, Scenario::Connect, 0);
    o.connections = 200;
    o.concurrency = 50;
    o.credentials = Some(creds.clone());
    o.broker_pid = Some(broker.child.id());
    let r = run(o.clone()).await.expect("connect run");
    println!("{}", r.to_table());
    assert_eq!(r.connections, 200);
    assert_eq!(r.failures, Some(0), "{:?}", r.failure_reasons);
    assert!(r.connect_secs.is_some_and(|s| s > 0.0));
    assert!(r.connects_per_sec.is_some_and(|v| v > 0.0));
    assert!(r.connect_p50_ms.is_some() && r.connect_p99_ms >= r.connect_p50_ms);
    assert!(r.reconnect_secs.is_none());

    // Reconnect storm: all 200 back.
    o.reconnect_storm = true;
    let r = run(o.clone()).await.expect("storm run");
    println!("{}", r.to_table());
    assert_eq!(r.failures, Some(0));
    assert_eq!(
        r.reconnect_failures,
        Some(0),
        "{:?}",
        r.reconnect_failure_reasons
    );
    assert!(r.reconnect_secs.is_some_and(|s| s > 0.0));

    // Idle with the same credentials.
    let mut o = opts(broker.port, Scenario::Idle, 0);
    o.connections = 20;
    o.duration = Duration::ZERO;
    o.credentials = Some(creds);
    let r = run(o).await.expect("idle run with credentials");
    assert_eq!(r.connections, 20);

    // Fewer lines than connections: a clear error.
    let mut o = opts(broker.port, Scenario::Connect, 0);
    o.connections = 300;
    o.credentials = Some(credentials_file(&broker._dir, 200));
    let err = run(o).await.expect_err("short credentials file");
    assert!(err.to_string().contains("200 entries"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refusals_are_counted() {
    let Some(broker) = start_mosquitto_with("allow_anonymous false") else {
        return;
    };
    let mut o = opts(broker.port, Scenario::Connect, 0);
    o.connections = 30;
    let started = Instant::now();
    let r = run(o).await.expect("connect run");
    println!("{}", r.to_table());
    assert!(started.elapsed() < Duration::from_secs(20), "refusals hung");
    assert_eq!(r.failures, Some(30));
    let reasons = r.failure_reasons.expect("reasons");
    // MQTT 3.1.1 return code 5 (not authorized), which the codec reports as
    // the MQTT 5 reason code 0x87.
    assert_eq!(reasons.get("0x87"), Some(&30), "{reasons:?}");
}
