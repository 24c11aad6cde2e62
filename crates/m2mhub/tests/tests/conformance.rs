//! `examples/conformance.toml`, the profile documented for interoperability
//! suites: the real server started from that file (ports and data directory
//! moved to the test's), checked for each behaviour the profile promises,
//! with our own clients.

use crate::common::{v3, v5, Raw, TestServer};
use m2mhub::settings::Settings;
use mqtt_codec::{reason, QoS};

/// The profile as a user would load it, on the test's ephemeral ports and
/// temporary data directory.
async fn start() -> TestServer {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/conformance.toml");
    let profile = Settings::load(Some(&path), &[]).expect("the conformance profile loads");
    TestServer::with(move |s| {
        let mut p = profile;
        p.data_dir = s.data_dir.clone();
        p.mqtt.listen = s.mqtt.listen.clone();
        p.mqtt.tls_listen = s.mqtt.tls_listen.clone();
        p.http.listen = s.http.listen.clone();
        *s = p;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_profile_behaves_as_documented() {
    let srv = start().await;
    let addr = srv.mqtt();

    // Anonymous clients are accepted, under both versions.
    let (mut five, _) = Raw::connect_ok(addr, v5("conf-five")).await;
    let (mut three, _) = Raw::connect_ok(addr, v3("conf-three")).await;

    // test/nosubscribe is refused with 0x80 under both versions; another
    // filter in the same session is granted.
    for c in [&mut five, &mut three] {
        let refused = c.subscribe(1, "test/nosubscribe", QoS::AtLeastOnce).await;
        assert_eq!(refused.reason_codes, [reason::UNSPECIFIED_ERROR]);
        let granted = c.subscribe(2, "test/ok", QoS::AtLeastOnce).await;
        assert_eq!(granted.reason_codes, [1]);
    }
    five.disconnect().await;
    three.disconnect().await;

    // Keep alive is capped to 60 s and MQTT 5 clients are told so.
    for (asked, told) in [(0, Some(60)), (120, Some(60)), (30, None)] {
        let mut c = v5("conf-keepalive");
        c.keep_alive = asked;
        let (raw, ack) = Raw::connect_ok(addr, c).await;
        assert_eq!(
            ack.properties.server_keep_alive, told,
            "asked for {asked} s"
        );
        raw.disconnect().await;
    }

    // One client id reconnecting more often than the default flapping limit
    // (20 a minute), dropping its connections abruptly: never banned.
    for i in 0..25 {
        let c = if i % 2 == 0 {
            v5("conf-again")
        } else {
            v3("conf-again")
        };
        let (raw, ack) = Raw::connect(addr, c).await;
        assert_eq!(ack.reason_code, 0, "reconnect {i} refused: {ack:?}");
        raw.drop_abruptly().await;
    }
    assert_eq!(srv.counter("bans_automatic"), 0);
}
