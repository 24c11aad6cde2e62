//! Will messages: published on an abrupt end, not on a normal DISCONNECT;
//! MQTT 5 will delay and DISCONNECT with reason 0x04.

use crate::common::*;
use mqtt_codec::{reason, QoS};
use rumqttc::QoS as RQoS;
use std::time::{Duration, Instant};

async fn will_watcher(srv: &TestServer, id: &str) -> Raw {
    let (mut w, _) = Raw::connect_ok(srv.mqtt(), v5(id)).await;
    w.subscribe(1, "will/#", QoS::AtLeastOnce).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_will_is_published_when_the_connection_drops() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-1").await;
    let mut o = V3::options(srv.mqtt(), "will-v3");
    o.set_last_will(rumqttc::LastWill::new(
        "will/v3",
        "gone",
        RQoS::AtLeastOnce,
        false,
    ));
    let (c, _) = V3::connect(o).await;
    watcher.expect_nothing(Duration::from_millis(100)).await;
    c.kill().await;
    let m = watcher.recv_publish().await;
    assert_eq!((m.topic.as_str(), text(&m).as_str()), ("will/v3", "gone"));
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert_eq!(srv.counter("wills_published"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_is_published_when_the_socket_closes_without_disconnect() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-2").await;
    let mut c = v5("will-v5-raw");
    let mut w = will("will/v5", "lost");
    w.properties.content_type = Some("text/plain".into());
    w.properties.user_properties = vec![("k".into(), "v".into())];
    c.will = Some(w);
    let (raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    raw.drop_abruptly().await;
    let m = watcher.recv_publish().await;
    assert_eq!((m.topic.as_str(), text(&m).as_str()), ("will/v5", "lost"));
    assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(m.properties.user_properties, vec![("k".into(), "v".into())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_not_published_on_normal_disconnect() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-3").await;

    let mut o = V3::options(srv.mqtt(), "will-normal-v3");
    o.set_last_will(rumqttc::LastWill::new(
        "will/n3",
        "x",
        RQoS::AtLeastOnce,
        false,
    ));
    let (c, _) = V3::connect(o).await;
    c.disconnect().await;

    let mut o = V5::options(srv.mqtt(), "will-normal-v5");
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "will/n5",
        "x",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        None,
    ));
    let (c, _) = V5::connect(o).await;
    c.disconnect().await;

    let mut c = v5("will-normal-raw");
    c.will = Some(will("will/nraw", "x"));
    let (raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    raw.disconnect().await;

    watcher.expect_nothing(Duration::from_millis(500)).await;
    assert_eq!(srv.counter("wills_published"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_delay_publishes_after_the_delay() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-4").await;
    let mut c = v5_persistent("will-delay", true, 30);
    let mut w = will("will/delayed", "late");
    w.properties.will_delay_interval = Some(1);
    c.will = Some(w);
    let (raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    let t0 = Instant::now();
    raw.drop_abruptly().await;
    let m = watcher.recv_publish().await;
    let took = t0.elapsed();
    assert_eq!(text(&m), "late");
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(2500),
        "will published after {took:?}, expected about 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_delay_is_cancelled_when_the_client_reconnects_in_time() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-5").await;
    let mut c = v5_persistent("will-cancel", true, 30);
    let mut w = will("will/cancelled", "never");
    w.properties.will_delay_interval = Some(1);
    c.will = Some(w);
    let (raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    raw.drop_abruptly().await;
    let (back, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("will-cancel", false, 30)).await;
    assert!(ack.session_present);
    watcher.expect_nothing(Duration::from_millis(1600)).await;
    back.disconnect().await;
    assert_eq!(srv.counter("wills_published"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_delay_longer_than_session_expiry_publishes_when_the_session_ends() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-6").await;
    let mut c = v5("will-expiry0");
    let mut w = will("will/session-end", "ended");
    w.properties.will_delay_interval = Some(30);
    c.will = Some(w);
    let (raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    let t0 = Instant::now();
    raw.drop_abruptly().await;
    let m = within_for(
        Duration::from_secs(2),
        "will at session end",
        watcher.recv_publish(),
    )
    .await;
    assert_eq!(text(&m), "ended");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_with_will_message_0x04_publishes_the_will() {
    let srv = TestServer::start().await;
    let mut watcher = will_watcher(&srv, "will-watch-7").await;
    let mut c = v5("will-0x04");
    let mut w = will("will/asked", "bye");
    w.retain = true;
    c.will = Some(w);
    let (mut raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    raw.send(&disconnect_with(reason::DISCONNECT_WITH_WILL))
        .await;
    let seen = raw.expect_close(WAIT).await;
    assert!(seen.is_empty(), "{seen:?}");
    let m = watcher.recv_publish().await;
    assert_eq!((m.topic.as_str(), text(&m).as_str()), ("will/asked", "bye"));
    // A retained will stays retained.
    let (mut late, _) = Raw::connect_ok(srv.mqtt(), v5("will-late")).await;
    late.subscribe(1, "will/asked", QoS::AtMostOnce).await;
    let m = late.recv_publish().await;
    assert!(m.retain);
    assert_eq!(text(&m), "bye");
}
