//! Interoperability with libcoap's `coap-client` (Debian: `libcoap3-bin`).
//! Skipped, with a notice, when no `coap-client` binary is installed.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{big_body, start};

/// The first libcoap client found on PATH (Debian installs the variants
/// under their TLS library's name).
fn coap_client() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in [
        "coap-client",
        "coap-client-notls",
        "coap-client-openssl",
        "coap-client-gnutls",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

async fn run(bin: PathBuf, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(bin).args(&args).output())
        .await
        .expect("coap-client task")
        .expect("coap-client runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_client_post_blockwise_get_and_observe() {
    let Some(bin) = coap_client() else {
        eprintln!("SKIPPED: no coap-client on PATH (apt-get install libcoap3-bin)");
        return;
    };
    let server = start().await;
    let base = format!("coap://127.0.0.1:{}", server.local_addr().port());

    // POST with a payload.
    let out = run(
        bin.clone(),
        vec![
            "-m".into(),
            "post".into(),
            "-e".into(),
            "hello coap".into(),
            format!("{base}/echo"),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("10 bytes"),
        "stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // GET of a 3000-byte body, which the server sends block-wise.
    let out = run(
        bin.clone(),
        vec![
            "-m".into(),
            "get".into(),
            "-b".into(),
            "1024".into(),
            format!("{base}/big"),
        ],
    )
    .await;
    let body = String::from_utf8_lossy(&big_body()).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&body),
        "stdout ({} bytes): {stdout} stderr: {}",
        stdout.len(),
        String::from_utf8_lossy(&out.stderr)
    );

    // Block1 upload: coap-client splits the payload with -b.
    let payload = "x".repeat(2000);
    let out = run(
        bin.clone(),
        vec![
            "-m".into(),
            "put".into(),
            "-b".into(),
            "256".into(),
            "-e".into(),
            payload,
            format!("{base}/upload"),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("2000 {}", 2000 * u64::from(b'x'))),
        "stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Observe for 3 s while the application pushes two new values.
    let notifier = server.notifier();
    let observe = tokio::spawn(run(
        bin,
        vec!["-s".into(), "3".into(), format!("{base}/temp")],
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    notifier.notify("temp", "21", Some(0)).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    notifier.notify("temp", "22", Some(0)).unwrap();
    let out = observe.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for value in ["20", "21", "22"] {
        assert!(
            stdout.contains(value),
            "{value} missing; stdout: {stdout} stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    server.shutdown().await;
}
