//! In-memory live state: what the log currently means after applying every op.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::record::{self, Entry, RecordBuilder};
use crate::{Op, Recovered, RecoveredSession, StoredMessage, StoredSession};

/// Per-record overhead counted in the live size estimate.
const RECORD_OVERHEAD: u64 = 12;

#[derive(Debug, Default)]
pub(crate) struct SessionEntry {
    /// None while only queued messages are known (an Enqueue arrived before its SessionPut).
    pub(crate) session: Option<StoredSession>,
    pub(crate) queue: BTreeMap<u64, Arc<StoredMessage>>,
}

#[derive(Debug, Default)]
pub(crate) struct LiveState {
    pub(crate) retained: HashMap<String, Arc<StoredMessage>>,
    pub(crate) sessions: HashMap<String, SessionEntry>,
    pub(crate) next_seq: u64,
    /// Estimated encoded size of the live state.
    pub(crate) live_bytes: u64,
}

fn retained_cost(msg: &StoredMessage) -> u64 {
    1 + record::message_len(msg)
}

fn session_cost(s: &StoredSession) -> u64 {
    1 + record::session_len(s)
}

fn enqueue_cost(client_id: &str, msg: &StoredMessage) -> u64 {
    1 + 4 + client_id.len() as u64 + 8 + record::message_len(msg)
}

impl LiveState {
    fn add(&mut self, n: u64) {
        self.live_bytes = self.live_bytes.saturating_add(n);
    }

    fn sub(&mut self, n: u64) {
        self.live_bytes = self.live_bytes.saturating_sub(n);
    }

    fn see_seq(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
    }

    pub(crate) fn apply_entry(&mut self, entry: Entry) {
        match entry {
            Entry::Op(op) => self.apply(op),
            Entry::SeqFloor(next) => self.next_seq = self.next_seq.max(next),
        }
    }

    pub(crate) fn apply(&mut self, op: Op) {
        match op {
            Op::RetainPut(msg) => {
                let cost = retained_cost(&msg);
                if let Some(old) = self.retained.insert(msg.topic.clone(), msg) {
                    self.sub(retained_cost(&old));
                }
                self.add(cost);
            }
            Op::RetainDelete { topic } => {
                if let Some(old) = self.retained.remove(&topic) {
                    self.sub(retained_cost(&old));
                }
            }
            Op::SessionPut(session) => {
                let cost = session_cost(&session);
                let entry = self.sessions.entry(session.client_id.clone()).or_default();
                let old = entry.session.replace(session);
                if let Some(old) = old {
                    self.sub(session_cost(&old));
                }
                self.add(cost);
            }
            Op::SessionDelete { client_id } => {
                if let Some(entry) = self.sessions.remove(&client_id) {
                    let mut cost = entry.session.as_ref().map_or(0, session_cost);
                    for msg in entry.queue.values() {
                        cost += enqueue_cost(&client_id, msg);
                    }
                    self.sub(cost);
                }
            }
            Op::Enqueue {
                client_id,
                seq,
                msg,
            } => {
                self.see_seq(seq);
                let cost = enqueue_cost(&client_id, &msg);
                let entry = self.sessions.entry(client_id.clone()).or_default();
                let old = entry.queue.insert(seq, msg);
                if let Some(old) = old {
                    self.sub(enqueue_cost(&client_id, &old));
                }
                self.add(cost);
            }
            Op::Ack { client_id, seq } => {
                self.see_seq(seq);
                let removed = self
                    .sessions
                    .get_mut(&client_id)
                    .and_then(|e| e.queue.remove(&seq));
                if let Some(old) = removed {
                    self.sub(enqueue_cost(&client_id, &old));
                }
            }
        }
    }

    /// Drop queues whose session was never stored (or was deleted); returns how many messages were dropped.
    pub(crate) fn drop_orphans(&mut self) -> usize {
        let mut dropped = 0;
        let mut cost = 0;
        self.sessions.retain(|client_id, e| {
            if e.session.is_some() {
                return true;
            }
            dropped += e.queue.len();
            for msg in e.queue.values() {
                cost += enqueue_cost(client_id, msg);
            }
            false
        });
        self.sub(cost);
        dropped
    }

    /// Snapshot for the broker (sessions without metadata are skipped).
    pub(crate) fn recovered(&self) -> Recovered {
        let mut retained: Vec<_> = self.retained.values().cloned().collect();
        retained.sort_by(|a, b| a.topic.cmp(&b.topic));
        let mut sessions: Vec<_> = self
            .sessions
            .values()
            .filter_map(|e| {
                e.session.as_ref().map(|s| RecoveredSession {
                    session: s.clone(),
                    queue: e.queue.iter().map(|(k, v)| (*k, v.clone())).collect(),
                })
            })
            .collect();
        sessions.sort_by(|a, b| a.session.client_id.cmp(&b.session.client_id));
        Recovered {
            retained,
            sessions,
            next_seq: self.next_seq,
        }
    }

    /// Encode the live state as records, calling `sink` with buffers of
    /// roughly `chunk` bytes. Sessions without metadata are not written.
    pub(crate) fn write_snapshot<E>(
        &self,
        chunk: usize,
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = Vec::with_capacity(chunk + 4096);
        let mut builder = RecordBuilder::begin(&mut buf);
        builder.seq_floor(self.next_seq);
        macro_rules! roll {
            () => {
                if builder.body_len() >= chunk {
                    // A body of `chunk` (+ one item) bytes always fits in u32.
                    let _ = builder.finish();
                    sink(&buf)?;
                    buf.clear();
                    builder = RecordBuilder::begin(&mut buf);
                }
            };
        }
        for msg in self.retained.values() {
            builder.retain_put(msg);
            roll!();
        }
        for (client_id, e) in &self.sessions {
            let Some(session) = &e.session else { continue };
            builder.session_put(session);
            roll!();
            for (seq, msg) in &e.queue {
                builder.enqueue(client_id, *seq, msg);
                roll!();
            }
        }
        if builder.count() > 0 {
            let _ = builder.finish();
            sink(&buf)?;
        }
        Ok(())
    }

    /// Estimated live size including per-record overhead.
    pub(crate) fn estimated_size(&self) -> u64 {
        self.live_bytes + RECORD_OVERHEAD + 8
    }
}
