//! The command line: `config default`, configuration errors, `passwd`.

use crate::common::*;
use bytes::Bytes;
use m2mhub::settings::Settings;
use mqtt_codec::reason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_default_prints_parseable_toml() {
    let (code, out, err) = run_bin(&["config", "default"], &[]).await;
    assert_eq!(code, 0, "{err}");
    let parsed: Settings = toml::from_str(&out).expect("`config default` is valid TOML");
    assert_eq!(parsed, Settings::default());
    parsed.validate().expect("the defaults validate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_environment_value_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let (code, _, err) = run_bin(
        &["serve", "--data-dir", data],
        &[("M2MHUB_MQTT_LISTEN", "nonsense")],
    )
    .await;
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("mqtt.listen"), "stderr names the key: {err}");
    let (code, _, err) = run_bin(
        &["serve", "--data-dir", data],
        &[("M2MHUB_MQTT_MAX_PACKET_SIZE", "big")],
    )
    .await;
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("mqtt.max_packet_size"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_file_key_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m2mhub.toml");
    std::fs::write(&file, "[mqtt]\nlisten_port = 1883\n").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let (code, _, err) = run_bin(&["serve", "--config", file, "--data-dir", data], &[]).await;
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("listen_port"), "stderr names the key: {err}");
    let (code, _, err) = run_bin(&["config", "check", "--config", file], &[]).await;
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("listen_port"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_prints_a_line_that_works_as_a_password_file() {
    let (code, out, err) = run_bin(&["passwd", "alice", "--password", "x"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("alice:"), "{out}");
    assert!(!out.contains(":x\n"), "the password itself is not stored");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwords");
    std::fs::write(&file, &out).expect("write");
    let srv = TestServer::with(|s| {
        s.mqtt.allow_anonymous = false;
        s.mqtt.password_file = file.display().to_string();
    })
    .await;
    let mut c = v5("passwd-ok");
    c.username = Some("alice".into());
    c.password = Some(Bytes::from_static(b"x"));
    let (_ok, ack) = Raw::connect(srv.mqtt(), c).await;
    assert_eq!(ack.reason_code, reason::SUCCESS);
    let mut c = v5("passwd-bad");
    c.username = Some("alice".into());
    c.password = Some(Bytes::from_static(b"y"));
    let (_bad, ack) = Raw::connect(srv.mqtt(), c).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
}
