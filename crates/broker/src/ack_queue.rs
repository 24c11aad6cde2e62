//! Acknowledgements of received PUBLISHes that wait for the platform.
//!
//! MQTT requires PUBACKs (and PUBRECs) in the order the PUBLISHes arrived,
//! so once one acknowledgement waits for its [`AckGate`], every later one of
//! the connection queues behind it, gated or not. No I/O here: the
//! connection pushes acknowledgements, polls [`AckQueue::poll_head`] in its
//! `select!` while it keeps reading, and writes what [`AckQueue::pop_ready`]
//! hands out.

use crate::events::AckGate;
use mqtt_codec::{reason, QoS};
use std::collections::VecDeque;
use std::task::{Context, Poll};

/// At most this many acknowledgements wait per connection (fewer when the
/// broker's `receive_maximum` is lower); beyond, the connection stops
/// reading until the oldest goes out.
pub(crate) const MAX_PENDING_ACKS: usize = 1024;

/// An acknowledgement that may go out now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReadyAck {
    pub qos: QoS,
    pub packet_id: u16,
    /// `Ok(code)`: acknowledge with the routing's reason code.
    /// `Err(code)`: the platform refused the message (code ≥ 0x80).
    pub outcome: Result<u8, u8>,
}

enum State {
    Waiting(AckGate),
    Done(Result<(), u8>),
}

struct Entry {
    qos: QoS,
    packet_id: u16,
    /// The routing's reason code, sent when the gate succeeds.
    code: u8,
    state: State,
}

#[derive(Default)]
pub(crate) struct AckQueue {
    entries: VecDeque<Entry>,
}

impl AckQueue {
    /// Queue the acknowledgement of a QoS 1/2 PUBLISH, behind every earlier
    /// one; `gate: None` when only the order holds it back.
    pub fn push(&mut self, qos: QoS, packet_id: u16, code: u8, gate: Option<AckGate>) {
        let state = match gate {
            Some(g) => State::Waiting(g),
            None => State::Done(Ok(())),
        };
        self.entries.push_back(Entry {
            qos,
            packet_id,
            code,
            state,
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ready once the oldest acknowledgement may go out. Also settles the
    /// gates right behind it that have resolved, so one wake-up releases a
    /// whole run of them.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for (i, e) in self.entries.iter_mut().enumerate() {
            if let State::Waiting(gate) = &mut e.state {
                match gate.as_mut().poll(cx) {
                    Poll::Ready(r) => e.state = State::Done(r),
                    Poll::Pending if i == 0 => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(()),
                }
            }
        }
        if self.entries.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// The oldest acknowledgement, if its gate has resolved.
    pub fn pop_ready(&mut self) -> Option<ReadyAck> {
        let front = self.entries.front()?;
        let State::Done(r) = front.state else {
            return None;
        };
        let e = self.entries.pop_front()?;
        Some(ReadyAck {
            qos: e.qos,
            packet_id: e.packet_id,
            // A refusal must not read as success to the client.
            outcome: match r {
                Ok(()) => Ok(e.code),
                Err(c) => Err(c.max(reason::UNSPECIFIED_ERROR)),
            },
        })
    }

    /// Whether a PUBREC for `packet_id` is queued (a retransmission of that
    /// QoS 2 message needs no second one).
    pub fn holds_pubrec(&self, packet_id: u16) -> bool {
        self.entries
            .iter()
            .any(|e| e.qos == QoS::ExactlyOnce && e.packet_id == packet_id)
    }

    /// Packet ids of the queued QoS 2 messages the platform has not (yet)
    /// confirmed: when the connection ends they must be forgotten, so the
    /// client's resend is processed anew instead of acknowledged as known.
    pub fn unconfirmed_qos2(&self) -> impl Iterator<Item = u16> + '_ {
        self.entries
            .iter()
            .filter(|e| e.qos == QoS::ExactlyOnce && !matches!(e.state, State::Done(Ok(()))))
            .map(|e| e.packet_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn gate() -> (oneshot::Sender<Result<(), u8>>, AckGate) {
        let (tx, rx) = oneshot::channel();
        (tx, Box::pin(async move { rx.await.unwrap_or(Err(0x80)) }))
    }

    struct NoWake;
    impl std::task::Wake for NoWake {
        fn wake(self: std::sync::Arc<Self>) {}
    }

    fn ready(q: &mut AckQueue) -> bool {
        let waker = std::task::Waker::from(std::sync::Arc::new(NoWake));
        let mut cx = Context::from_waker(&waker);
        q.poll_head(&mut cx).is_ready()
    }

    fn drain(q: &mut AckQueue) -> Vec<(u16, Result<u8, u8>)> {
        std::iter::from_fn(|| q.pop_ready())
            .map(|a| (a.packet_id, a.outcome))
            .collect()
    }

    #[test]
    fn acknowledgements_leave_in_receive_order() {
        let mut q = AckQueue::default();
        let (t1, g1) = gate();
        let (t2, g2) = gate();
        q.push(QoS::AtLeastOnce, 1, 0, Some(g1));
        q.push(QoS::AtLeastOnce, 2, 0x10, Some(g2));
        q.push(QoS::AtLeastOnce, 3, 0, None);
        assert!(!ready(&mut q));
        assert_eq!(drain(&mut q), vec![]);

        // The second resolves first: nothing may overtake the first.
        t2.send(Ok(())).expect("receiver alive");
        assert!(!ready(&mut q));
        assert_eq!(drain(&mut q), vec![]);

        t1.send(Err(0x97)).expect("receiver alive");
        assert!(ready(&mut q));
        assert_eq!(
            drain(&mut q),
            vec![(1, Err(0x97)), (2, Ok(0x10)), (3, Ok(0))]
        );
        assert!(q.is_empty());
        assert!(!ready(&mut q));
    }

    #[test]
    fn a_refusal_never_reads_as_success() {
        let mut q = AckQueue::default();
        let (t, g) = gate();
        q.push(QoS::ExactlyOnce, 7, 0, Some(g));
        t.send(Err(0)).expect("receiver alive");
        assert!(ready(&mut q));
        assert_eq!(drain(&mut q), vec![(7, Err(reason::UNSPECIFIED_ERROR))]);
    }

    #[test]
    fn unconfirmed_qos2_ids_are_the_ones_not_stored() {
        let mut q = AckQueue::default();
        let (_t1, g1) = gate();
        let (t2, g2) = gate();
        let (t3, g3) = gate();
        q.push(QoS::ExactlyOnce, 1, 0, Some(g1));
        q.push(QoS::ExactlyOnce, 2, 0, Some(g2));
        q.push(QoS::ExactlyOnce, 3, 0, Some(g3));
        q.push(QoS::ExactlyOnce, 4, 0, None);
        q.push(QoS::AtLeastOnce, 5, 0, None);
        t2.send(Ok(())).expect("receiver alive");
        t3.send(Err(0x80)).expect("receiver alive");
        // Settles 2 and 3 only if polled; the head (1) still waits.
        assert!(!ready(&mut q));
        assert!(q.holds_pubrec(4));
        assert!(!q.holds_pubrec(5));
        let mut ids: Vec<u16> = q.unconfirmed_qos2().collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3]);
    }
}
