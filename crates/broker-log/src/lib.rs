//! The broker's log: embedded, crash-safe, append-only storage for the m2mhub MQTT broker.
//!
//! The store keeps two kinds of state under the broker's data directory:
//! retained messages, and persistent MQTT sessions (their subscriptions plus
//! the QoS 1/2 messages queued for them). Every change is an [`Op`]; the ops
//! passed to one [`Store::commit`] call form a *batch* that is appended to a
//! single log file (`broker.log`) as one CRC-protected record, so a batch is
//! applied entirely or not at all on replay. Appending is the cheapest write a
//! disk can do and never rewrites acknowledged data in place, so a crash can
//! only ever damage the tail of the log: on open the log is replayed and a torn
//! or corrupt tail is cut off. One dedicated writer thread *group-commits*:
//! it drains every request queued while the previous write was in progress and
//! writes them with a single `write(2)` (and a single `fdatasync` in
//! [`Durability::Fsync`] mode), so many concurrent publishers share the cost of
//! one system call. The writer also keeps the live state in memory and
//! periodically *compacts* the log by writing that state to a fresh file and
//! atomically renaming it over the old one.
//!
//! Durability: a commit future resolves only after the batch has been handed
//! to the kernel with `write(2)`. With [`Durability::Write`] the data then
//! lives in the page cache and survives a process crash (`kill -9`, panic,
//! OOM kill) but not a power cut or kernel crash. With [`Durability::Fsync`]
//! the writer also calls `fdatasync` before acknowledging, so committed data
//! survives a power loss as well. [`Store::submit`] queues ops without waiting
//! and is meant for writes whose loss only causes a duplicate redelivery.
#![forbid(unsafe_code)]

mod log;
mod record;
mod state;
mod writer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::writer::{Request, Shared, Waiter};

/// A message as stored for retention or in a session queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub payload_format_indicator: Option<u8>,
    /// Absolute expiry deadline, Unix milliseconds.
    pub expires_at_ms: Option<u64>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// One subscription of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    pub filter: String,
    /// MQTT 5 subscription options byte.
    pub options: u8,
    pub subscription_id: Option<u32>,
}

/// Metadata and subscriptions of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub client_id: String,
    pub protocol_v5: bool,
    /// Session expiry interval in seconds (u32::MAX = never).
    pub expiry_interval: u32,
    /// When the client last disconnected (Unix ms), None while connected.
    pub disconnected_at_ms: Option<u64>,
    pub subscriptions: Vec<StoredSubscription>,
}

/// One change to the stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    RetainPut(Arc<StoredMessage>),
    RetainDelete {
        topic: String,
    },
    /// Insert or replace a session's metadata and full subscription list (queued messages kept).
    SessionPut(StoredSession),
    /// Remove a session and all its queued messages.
    SessionDelete {
        client_id: String,
    },
    /// Queue a message for a session; `seq` is unique and increasing per store (broker-assigned).
    Enqueue {
        client_id: String,
        seq: u64,
        msg: Arc<StoredMessage>,
    },
    /// The session no longer needs the message (delivered and acknowledged, expired or dropped).
    Ack {
        client_id: String,
        seq: u64,
    },
}

/// A session recovered from the log, with its queued messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredSession {
    pub session: StoredSession,
    /// Ordered by seq.
    pub queue: Vec<(u64, Arc<StoredMessage>)>,
}

/// Everything recovered by [`Store::open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Sorted by topic.
    pub retained: Vec<Arc<StoredMessage>>,
    /// Sorted by client id.
    pub sessions: Vec<RecoveredSession>,
    /// One more than the highest seq ever seen.
    pub next_seq: u64,
}

/// When a commit is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// write(2) before acknowledging: survives a process crash (kill -9), not a power cut.
    Write,
    /// fdatasync before acknowledging: survives a power cut.
    Fsync,
}

/// Options for [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Compact when the log exceeds this many bytes and twice the live size.
    pub compact_threshold_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Write,
            compact_threshold_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Errors reported by the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The log cannot be used at all (e.g. wrong magic); torn tails are repaired instead.
    #[error("store log {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A single batch does not fit in one record (more than 4 GiB encoded).
    #[error("batch too large for one log record ({len} bytes)")]
    TooLarge { len: usize },
    /// The writer thread is gone.
    #[error("store writer is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// A copy of this error for another waiter of the same failed group.
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { context, source } => StoreError::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Corrupt { path, reason } => StoreError::Corrupt {
                path: path.clone(),
                reason: reason.clone(),
            },
            StoreError::TooLarge { len } => StoreError::TooLarge { len: *len },
            StoreError::Closed => StoreError::Closed,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Current size of the log file in bytes.
    pub log_bytes: u64,
    /// Batch records appended (one per non-empty commit/submit).
    pub records_written: u64,
    /// Ops appended.
    pub ops_written: u64,
    /// Group commits (write calls) performed.
    pub commits: u64,
    /// Compactions completed.
    pub compactions: u64,
    /// Failed group writes (each failed every waiter of its group).
    pub write_errors: u64,
}

struct Inner {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(handle) = self.thread.lock().take() {
            if handle.thread().id() != std::thread::current().id() && handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

/// Handle to the store; cheap to clone. The writer thread flushes and exits
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Open or create the store in `dir` (creating dir), replay the log, cut
    /// off a torn or corrupt tail (with a warning), and start the writer thread.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<(Store, Recovered), StoreError> {
        let replay = log::open_log(dir)?;
        let recovered = replay.state.recovered();
        let shared = Arc::new(Shared::new(replay.len));
        let handle = writer::spawn(dir.to_path_buf(), options, replay, shared.clone())?;
        let store = Store {
            inner: Arc::new(Inner {
                shared,
                thread: Mutex::new(Some(handle)),
            }),
        };
        Ok((store, recovered))
    }

    /// Queue ops for the writer; the returned future resolves when they are
    /// written (and synced if [`Durability::Fsync`]). Ops submitted together
    /// are applied atomically on replay. The ops are queued when this method
    /// is called, not when the future is first polled.
    pub fn commit(
        &self,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.shared.push(Request::Ops {
            ops,
            waiter: Some(Waiter::Async(tx)),
        });
        async move { rx.await.unwrap_or(Err(StoreError::Closed)) }
    }

    /// Queue ops without waiting (for acks and session metadata, where a lost
    /// write only means a duplicate redelivery).
    pub fn submit(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        self.inner.shared.push(Request::Ops { ops, waiter: None });
    }

    /// Blocking variant of [`Store::commit`] for non-async callers / shutdown.
    /// Safe to call from inside a tokio runtime thread (it blocks that thread).
    pub fn commit_blocking(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.shared.push(Request::Ops {
            ops,
            waiter: Some(Waiter::Blocking(tx)),
        });
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Write and fsync everything queued so far, then return.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.shared.push(Request::Flush(Waiter::Blocking(tx)));
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Counters for metrics.
    pub fn stats(&self) -> StoreStats {
        self.inner.shared.stats()
    }
}

#[cfg(test)]
impl Store {
    /// Make the next `n` group writes fail (after writing half their data).
    pub(crate) fn fail_next_writes(&self, n: u64) {
        self.inner
            .shared
            .fail_writes
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests;
