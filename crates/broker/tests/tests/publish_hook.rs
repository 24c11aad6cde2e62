//! The publish hook: its gate holds back PUBACK/PUBREC (durable telemetry
//! acknowledgement) without delaying routing or the reading of further
//! packets, and acknowledgements stay in receive order.

use crate::common::{publish, v3, v5, within, Raw, TestBroker, QUIET};
use m2mhub_broker::auth::ClientIdentity;
use m2mhub_broker::message::Message;
use m2mhub_broker::{AckGate, BrokerConfig, PublishHook};
use mqtt_codec::{reason, Packet, Publish, QoS};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Gated topic; every other topic is acknowledged without waiting.
const TELEMETRY: &str = "devices/x/telemetry";

/// One call of the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    client_id: String,
    topic: String,
    qos: QoS,
    payload: String,
}

/// A gate handed to the test, which decides when and how it resolves.
struct Gate {
    payload: String,
    tx: oneshot::Sender<Result<(), u8>>,
}

impl Gate {
    fn resolve(self, r: Result<(), u8>) {
        assert!(self.tx.send(r).is_ok(), "the broker dropped the gate");
    }
}

/// Records every call; gates `TELEMETRY` on a oneshot the test resolves.
struct TestHook {
    calls: Mutex<Vec<Call>>,
    gates: mpsc::UnboundedSender<Gate>,
}

impl PublishHook for TestHook {
    fn on_publish(
        &self,
        client_id: &str,
        _identity: &ClientIdentity,
        message: &Message,
    ) -> Option<AckGate> {
        let payload = String::from_utf8_lossy(&message.payload).into_owned();
        self.calls.lock().push(Call {
            client_id: client_id.to_string(),
            topic: message.topic.clone(),
            qos: message.qos,
            payload: payload.clone(),
        });
        if message.topic != TELEMETRY {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.gates.send(Gate { payload, tx });
        // A gate dropped by the test reads as a failed store write.
        Some(Box::pin(async move {
            rx.await.unwrap_or(Err(reason::UNSPECIFIED_ERROR))
        }))
    }
}

struct Harness {
    srv: TestBroker,
    hook: Arc<TestHook>,
    gates: mpsc::UnboundedReceiver<Gate>,
}

impl Harness {
    async fn start(f: impl FnOnce(&mut BrokerConfig)) -> Harness {
        let srv = TestBroker::start(f).await;
        let (tx, gates) = mpsc::unbounded_channel();
        let hook = Arc::new(TestHook {
            calls: Mutex::new(Vec::new()),
            gates: tx,
        });
        srv.broker.set_publish_hook(hook.clone());
        Harness { srv, hook, gates }
    }

    async fn client(&self, c: mqtt_codec::Connect) -> Raw {
        Raw::connect(self.srv.addr, c).await
    }

    /// The next gate the hook handed out.
    async fn gate(&mut self) -> Gate {
        within("a gate from the hook", self.gates.recv())
            .await
            .expect("hook alive")
    }

    /// The next gate, which must be for `payload`.
    async fn gate_for(&mut self, payload: &str) -> Gate {
        let g = self.gate().await;
        assert_eq!(g.payload, payload, "gates in publish order");
        g
    }

    /// No further gate within `QUIET`.
    async fn no_gate(&mut self) {
        if let Ok(g) = tokio::time::timeout(QUIET, self.gates.recv()).await {
            panic!("unexpected gate: {:?}", g.map(|g| g.payload));
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.hook.calls.lock().clone()
    }
}

#[tokio::test]
async fn puback_waits_for_the_gate() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v5("gate-one")).await;
    c.send(&publish(TELEMETRY, QoS::AtLeastOnce, 1, "t1")).await;
    let g = h.gate_for("t1").await;
    c.expect_nothing().await;

    g.resolve(Ok(()));
    // The routing's own reason code, as without a hook.
    assert_eq!(c.expect_puback(1).await, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(
        h.calls(),
        vec![Call {
            client_id: "gate-one".into(),
            topic: TELEMETRY.into(),
            qos: QoS::AtLeastOnce,
            payload: "t1".into(),
        }]
    );
}

#[tokio::test]
async fn pubacks_keep_receive_order_whatever_order_gates_resolve_in() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v5("gate-order")).await;
    for (pid, payload) in [(1, "a"), (2, "b"), (3, "c")] {
        c.send(&publish(TELEMETRY, QoS::AtLeastOnce, pid, payload))
            .await;
    }
    c.send(&publish("devices/x/status", QoS::AtLeastOnce, 4, "d"))
        .await;
    // The connection keeps reading while acknowledgements wait: every
    // PUBLISH reached the hook, and a PINGREQ is answered (ahead of them).
    c.ping().await;
    assert_eq!(h.calls().len(), 4);
    let ga = h.gate_for("a").await;
    let gb = h.gate_for("b").await;
    let gc = h.gate_for("c").await;

    gc.resolve(Ok(()));
    gb.resolve(Ok(()));
    c.expect_nothing().await;

    ga.resolve(Ok(()));
    for pid in 1..=4 {
        c.expect_puback(pid).await;
    }
    c.expect_nothing().await;

    // Drained: acknowledgements go out at once again.
    c.send(&publish("devices/x/status", QoS::AtLeastOnce, 5, "e"))
        .await;
    c.expect_puback(5).await;
}

#[tokio::test]
async fn refusal_is_a_negative_puback_on_mqtt5() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v5("gate-refuse5")).await;
    c.send(&publish(TELEMETRY, QoS::AtLeastOnce, 1, "x")).await;
    c.send(&publish("devices/x/status", QoS::AtLeastOnce, 2, "y"))
        .await;
    h.gate_for("x").await.resolve(Err(reason::QUOTA_EXCEEDED));
    assert_eq!(c.expect_puback(1).await, reason::QUOTA_EXCEEDED);
    assert_eq!(c.expect_puback(2).await, reason::NO_MATCHING_SUBSCRIBERS);
    assert_eq!(h.srv.counter("publishes_refused_by_hook"), 1);
}

#[tokio::test]
async fn refusal_is_no_puback_on_mqtt311() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v3("gate-refuse3")).await;
    c.send(&publish(TELEMETRY, QoS::AtLeastOnce, 1, "x")).await;
    c.send(&publish("devices/x/status", QoS::AtLeastOnce, 2, "y"))
        .await;
    h.gate_for("x").await.resolve(Err(reason::QUOTA_EXCEEDED));
    // 3.1.1 cannot refuse: the refused message gets nothing, the next its
    // normal acknowledgement.
    assert_eq!(c.expect_puback(2).await, 0);
    c.expect_nothing().await;
    assert_eq!(h.srv.counter("publishes_refused_by_hook"), 1);
}

#[tokio::test]
async fn pubrec_waits_for_the_gate() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v5("gate-qos2")).await;
    c.send(&publish(TELEMETRY, QoS::ExactlyOnce, 5, "q2")).await;
    let g = h.gate_for("q2").await;
    c.expect_nothing().await;
    g.resolve(Ok(()));
    assert_eq!(c.expect_pubrec(5).await, reason::NO_MATCHING_SUBSCRIBERS);
    c.pubrel(5).await;
    match c.recv().await {
        Packet::PubComp(r) => assert_eq!((r.packet_id, r.reason_code), (5, 0)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test]
async fn refused_qos2_message_is_processed_anew_when_resent() {
    let mut h = Harness::start(|_| {}).await;

    // MQTT 5: PUBREC carries the refusal; the packet id is free again.
    let mut c5 = h.client(v5("gate-qos2-refuse5")).await;
    c5.send(&publish(TELEMETRY, QoS::ExactlyOnce, 6, "r5"))
        .await;
    h.gate_for("r5")
        .await
        .resolve(Err(reason::UNSPECIFIED_ERROR));
    assert_eq!(c5.expect_pubrec(6).await, reason::UNSPECIFIED_ERROR);
    c5.send(&publish(TELEMETRY, QoS::ExactlyOnce, 6, "r5"))
        .await;
    h.gate_for("r5").await.resolve(Ok(()));
    assert_eq!(c5.expect_pubrec(6).await, reason::NO_MATCHING_SUBSCRIBERS);

    // MQTT 3.1.1: no PUBREC; the resend is a new message, not a known one.
    let mut c3 = h.client(v3("gate-qos2-refuse3")).await;
    c3.send(&publish(TELEMETRY, QoS::ExactlyOnce, 7, "r3"))
        .await;
    h.gate_for("r3")
        .await
        .resolve(Err(reason::UNSPECIFIED_ERROR));
    c3.expect_nothing().await;
    let mut resend = publish(TELEMETRY, QoS::ExactlyOnce, 7, "r3");
    if let Packet::Publish(p) = &mut resend {
        p.dup = true;
    }
    c3.send(&resend).await;
    let g = h.gate_for("r3").await;
    c3.expect_nothing().await;
    g.resolve(Ok(()));
    assert_eq!(c3.expect_pubrec(7).await, 0);
}

#[tokio::test]
async fn qos2_message_pending_at_disconnect_is_processed_anew() {
    let mut h = Harness::start(|_| {}).await;
    let mut persistent = v3("gate-qos2-drop");
    persistent.clean_start = false;
    let mut c = h.client(persistent.clone()).await;
    c.send(&publish(TELEMETRY, QoS::ExactlyOnce, 9, "p")).await;
    let mut first = h.gate_for("p").await;
    drop(c);
    // The pending acknowledgement (and its gate) went with the connection.
    within("the gate to be dropped", first.tx.closed()).await;

    let mut c = h.client(persistent).await;
    c.send(&publish(TELEMETRY, QoS::ExactlyOnce, 9, "p")).await;
    let g = h.gate_for("p").await;
    c.expect_nothing().await;
    g.resolve(Ok(()));
    assert_eq!(c.expect_pubrec(9).await, 0);
}

#[tokio::test]
async fn qos0_publish_calls_the_hook_and_drops_the_gate() {
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v5("gate-qos0")).await;
    c.send(&publish(TELEMETRY, QoS::AtMostOnce, 0, "zero"))
        .await;
    c.ping().await;
    let mut g = h.gate_for("zero").await;
    within("the QoS 0 gate to be dropped", g.tx.closed()).await;
    assert_eq!(h.calls().len(), 1);
    assert_eq!(h.calls()[0].qos, QoS::AtMostOnce);
    // Nothing is held back behind it.
    c.send(&publish("devices/x/status", QoS::AtLeastOnce, 1, "s"))
        .await;
    c.expect_puback(1).await;
}

#[tokio::test]
async fn subscribers_get_gated_messages_at_once() {
    let mut h = Harness::start(|_| {}).await;
    let mut sub = h.client(v5("gate-sub")).await;
    sub.subscribe(1, "devices/+/telemetry", QoS::AtLeastOnce)
        .await;
    let mut c = h.client(v5("gate-pub")).await;
    c.send(&publish(TELEMETRY, QoS::AtLeastOnce, 1, "live"))
        .await;
    let g = h.gate_for("live").await;

    let p: Publish = match sub.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!(&p.payload[..], b"live");
    c.expect_nothing().await;

    g.resolve(Ok(()));
    assert_eq!(c.expect_puback(1).await, reason::SUCCESS);
}

#[tokio::test]
async fn a_full_ack_queue_stops_reading() {
    let mut h = Harness::start(|c| c.receive_maximum = 2).await;
    let mut c = h.client(v3("gate-full")).await;
    for (pid, payload) in [(1, "1"), (2, "2"), (3, "3"), (4, "4")] {
        c.send(&publish(TELEMETRY, QoS::AtLeastOnce, pid, payload))
            .await;
    }
    c.send(&Packet::PingReq).await;
    let g1 = h.gate_for("1").await;
    let g2 = h.gate_for("2").await;
    // Two acknowledgements wait: the rest stays unread, the ping too.
    h.no_gate().await;
    c.expect_nothing().await;

    g1.resolve(Ok(()));
    c.expect_puback(1).await;
    let g3 = h.gate_for("3").await;
    h.no_gate().await;

    g2.resolve(Ok(()));
    c.expect_puback(2).await;
    let g4 = h.gate_for("4").await;
    c.expect_nothing().await;

    g3.resolve(Ok(()));
    c.expect_puback(3).await;
    assert!(matches!(c.recv().await, Packet::PingResp));
    g4.resolve(Ok(()));
    c.expect_puback(4).await;
}

#[tokio::test]
async fn a_replaced_hook_takes_over_at_the_next_publish() {
    struct Counting(AtomicUsize);
    impl PublishHook for Counting {
        fn on_publish(&self, _: &str, _: &ClientIdentity, _: &Message) -> Option<AckGate> {
            self.0.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
    let mut h = Harness::start(|_| {}).await;
    let mut c = h.client(v5("gate-replace")).await;
    c.send(&publish(TELEMETRY, QoS::AtLeastOnce, 1, "old"))
        .await;
    h.gate_for("old").await.resolve(Ok(()));
    c.expect_puback(1).await;

    let counting = Arc::new(Counting(AtomicUsize::new(0)));
    h.srv.broker.set_publish_hook(counting.clone());
    c.send(&publish(TELEMETRY, QoS::AtLeastOnce, 2, "new"))
        .await;
    c.expect_puback(2).await;
    assert_eq!(counting.0.load(Ordering::Relaxed), 1);
    assert_eq!(h.calls().len(), 1);
}
