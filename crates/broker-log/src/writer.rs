//! The group-commit writer thread.
//!
//! Submitters push requests onto a mutex-protected vector and signal a
//! condvar (a push is a short critical section, cheap under contention). The
//! writer swaps the whole vector out, encodes every request as one record into
//! a single buffer, issues one `write_all` (plus one `fdatasync` in Fsync mode
//! or when a flush was requested), then applies the ops to the live state and
//! wakes every waiter.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::log::{self, Replay};
use crate::record;
use crate::state::LiveState;
use crate::{Durability, Op, StoreError, StoreOptions, StoreStats};

pub(crate) enum Waiter {
    Async(tokio::sync::oneshot::Sender<Result<(), StoreError>>),
    Blocking(std::sync::mpsc::SyncSender<Result<(), StoreError>>),
}

impl Waiter {
    fn send(self, result: Result<(), StoreError>) {
        // A waiter that went away (dropped future) is not an error.
        match self {
            Waiter::Async(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

pub(crate) enum Request {
    Ops {
        ops: Vec<Op>,
        waiter: Option<Waiter>,
    },
    /// Write everything queued before it and fsync.
    Flush(Waiter),
}

struct Queue {
    requests: Vec<Request>,
    closed: bool,
}

#[derive(Default)]
struct Counters {
    log_bytes: AtomicU64,
    records_written: AtomicU64,
    ops_written: AtomicU64,
    commits: AtomicU64,
    compactions: AtomicU64,
    write_errors: AtomicU64,
}

/// State shared between `Store` handles and the writer thread.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    counters: Counters,
    /// Test hook: the next N group writes write half their data and fail with ENOSPC.
    #[cfg(test)]
    pub(crate) fail_writes: AtomicU64,
}

impl Shared {
    pub(crate) fn new(log_bytes: u64) -> Self {
        let counters = Counters::default();
        counters.log_bytes.store(log_bytes, Ordering::Relaxed);
        Shared {
            queue: Mutex::new(Queue {
                requests: Vec::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            counters,
            #[cfg(test)]
            fail_writes: AtomicU64::new(0),
        }
    }

    /// Queue a request. If the writer is gone the request is dropped, which
    /// makes its waiter observe `StoreError::Closed`.
    pub(crate) fn push(&self, req: Request) {
        let mut q = self.queue.lock();
        if q.closed {
            drop(q);
            tracing::warn!("store request after writer closed; dropped");
            return;
        }
        q.requests.push(req);
        let first = q.requests.len() == 1;
        drop(q);
        if first {
            self.cv.notify_one();
        }
    }

    pub(crate) fn close(&self) {
        self.queue.lock().closed = true;
        self.cv.notify_one();
    }

    pub(crate) fn stats(&self) -> StoreStats {
        let c = &self.counters;
        StoreStats {
            log_bytes: c.log_bytes.load(Ordering::Relaxed),
            records_written: c.records_written.load(Ordering::Relaxed),
            ops_written: c.ops_written.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// Marks the queue closed and fails pending requests if the writer exits
/// (normally or by panic), so no submitter waits forever.
struct CloseGuard(Arc<Shared>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let pending = {
            let mut q = self.0.queue.lock();
            q.closed = true;
            std::mem::take(&mut q.requests)
        };
        if !pending.is_empty() {
            tracing::error!(
                pending = pending.len(),
                "store writer exited with requests pending"
            );
        }
        drop(pending);
    }
}

struct Writer {
    dir: PathBuf,
    options: StoreOptions,
    file: File,
    /// Length of the valid data in the file.
    len: u64,
    /// The file may hold a partial write beyond `len` that must be cut first.
    dirty: bool,
    state: LiveState,
    shared: Arc<Shared>,
    buf: Vec<u8>,
    /// After a failed compaction, do not retry before the log reaches this size.
    compact_retry_at: u64,
}

pub(crate) fn spawn(
    dir: PathBuf,
    options: StoreOptions,
    replay: Replay,
    shared: Arc<Shared>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let mut writer = Writer {
        dir,
        options,
        file: replay.file,
        len: replay.len,
        dirty: false,
        state: replay.state,
        shared,
        buf: Vec::with_capacity(64 * 1024),
        compact_retry_at: 0,
    };
    std::thread::Builder::new()
        .name("m2mhub-store-writer".into())
        .spawn(move || writer.run())
        .map_err(|e| StoreError::io("spawn store writer thread", e))
}

impl Writer {
    fn run(&mut self) {
        let _guard = CloseGuard(self.shared.clone());
        tracing::debug!("store writer started");
        self.maybe_compact();
        let mut group = Vec::new();
        loop {
            {
                let mut q = self.shared.queue.lock();
                while q.requests.is_empty() && !q.closed {
                    self.shared.cv.wait(&mut q);
                }
                if q.requests.is_empty() {
                    break; // closed and drained
                }
                std::mem::swap(&mut q.requests, &mut group);
            }
            self.process(&mut group);
        }
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "final fsync of store log failed");
        }
        tracing::debug!("store writer stopped");
    }

    fn process(&mut self, group: &mut Vec<Request>) {
        self.buf.clear();
        let mut waiters = Vec::with_capacity(group.len());
        let mut batches = Vec::with_capacity(group.len());
        let mut force_sync = false;
        let mut records = 0u64;
        let mut ops_count = 0u64;
        for req in group.drain(..) {
            match req {
                Request::Ops { ops, waiter } => {
                    if !ops.is_empty() {
                        if let Err(record::TooLarge(len)) =
                            record::encode_batch(&mut self.buf, &ops)
                        {
                            tracing::error!(len, "store batch too large; rejected");
                            if let Some(w) = waiter {
                                w.send(Err(StoreError::TooLarge { len }));
                            }
                            continue;
                        }
                        records += 1;
                        ops_count += ops.len() as u64;
                        batches.push(ops);
                    }
                    waiters.extend(waiter);
                }
                Request::Flush(w) => {
                    force_sync = true;
                    waiters.push(w);
                }
            }
        }

        let sync = force_sync || self.options.durability == Durability::Fsync;
        match self.write_buf(sync) {
            Ok(()) => {
                let c = &self.shared.counters;
                if !self.buf.is_empty() {
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    c.records_written.fetch_add(records, Ordering::Relaxed);
                    c.ops_written.fetch_add(ops_count, Ordering::Relaxed);
                    c.log_bytes.store(self.len, Ordering::Relaxed);
                }
                tracing::trace!(
                    records,
                    bytes = self.buf.len(),
                    waiters = waiters.len(),
                    "store group committed"
                );
                for w in waiters {
                    w.send(Ok(()));
                }
                for ops in batches {
                    for op in ops {
                        self.state.apply(op);
                    }
                }
                self.maybe_compact();
            }
            Err(err) => {
                self.shared
                    .counters
                    .write_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = %err,
                    records,
                    waiters = waiters.len(),
                    "store write failed; group rejected"
                );
                self.repair();
                for w in waiters {
                    w.send(Err(err.duplicate()));
                }
            }
        }
    }

    /// Append `self.buf` (if any) and sync if requested.
    fn write_buf(&mut self, sync: bool) -> Result<(), StoreError> {
        let path = log::log_path(&self.dir);
        if self.dirty {
            self.repair();
            if self.dirty {
                return Err(StoreError::io(
                    format!("restore end of {}", path.display()),
                    std::io::Error::other("log could not be truncated after an earlier error"),
                ));
            }
        }
        if !self.buf.is_empty() {
            self.dirty = true;
            #[cfg(test)]
            if self
                .shared
                .fail_writes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let half = self.buf.len() / 2;
                let _ = self.file.write_all(&self.buf[..half]);
                return Err(StoreError::io(
                    format!("append to {}", path.display()),
                    std::io::Error::from(std::io::ErrorKind::StorageFull),
                ));
            }
            self.file
                .write_all(&self.buf)
                .map_err(|e| StoreError::io(format!("append to {}", path.display()), e))?;
        }
        if sync {
            self.dirty = true;
            self.file
                .sync_data()
                .map_err(|e| StoreError::io(format!("fdatasync {}", path.display()), e))?;
        }
        self.dirty = false;
        self.len += self.buf.len() as u64;
        Ok(())
    }

    /// Cut the file back to the last good length after a failed write.
    fn repair(&mut self) {
        let len = self.len;
        match self
            .file
            .set_len(len)
            .and_then(|()| self.file.seek(SeekFrom::Start(len)))
        {
            Ok(_) => self.dirty = false,
            Err(e) => {
                self.dirty = true;
                tracing::error!(error = %e, len, "could not truncate store log back to last good length");
            }
        }
    }

    fn maybe_compact(&mut self) {
        let threshold = self.options.compact_threshold_bytes;
        let live = self.state.estimated_size();
        if self.len <= threshold
            || self.len <= live.saturating_mul(2)
            || self.len < self.compact_retry_at
        {
            return;
        }
        let before = self.len;
        let dropped = self.state.drop_orphans();
        match log::write_compacted(&self.dir, &self.state) {
            Ok((file, len)) => {
                self.file = file;
                self.len = len;
                self.dirty = false;
                self.compact_retry_at = 0;
                // Re-base the estimate on the real size to avoid drift.
                self.state.live_bytes = len;
                let c = &self.shared.counters;
                c.compactions.fetch_add(1, Ordering::Relaxed);
                c.log_bytes.store(len, Ordering::Relaxed);
                tracing::info!(
                    before,
                    after = len,
                    orphans_dropped = dropped,
                    "store log compacted"
                );
            }
            Err(e) => {
                self.compact_retry_at = before.saturating_add(threshold.max(1 << 20) / 2);
                tracing::warn!(error = %e, "store log compaction failed; continuing with old log");
            }
        }
    }
}
