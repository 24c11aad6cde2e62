//! The store: open and recover, append with group commit, flush heads to
//! partitions at checkpoints, compact and expire partitions.
//!
//! Threads: callers append from any thread and get a [`Ticket`]; one
//! *writer* thread turns everything queued into one WAL write and one
//! `fdatasync`, applies the points to the head chunks and completes the
//! tickets; one *maintenance* thread flushes frozen heads into partition
//! files, writes checkpoints, compacts closed partitions and applies
//! retention. Queries (`query.rs`) read under a short read lock and do
//! their file reads after releasing it.

use crate::error::{is_disk_full, TsdbError};
use crate::head::{ChunkBytes, Frozen, Heads, LatestTable};
use crate::model::{Agg, InPoint, Kind, Retention, SeriesId, SeriesKey, Stats, Value};
use crate::part::{PartView, PartWriter, SeriesWrite};
use crate::rollup::{self, HOUR, MINUTE};
use crate::series::{encode_def, SeriesIndex, SeriesLog, SeriesMeta};
use crate::wal::{self, encode_points, Wal};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Longest metric, device or tenant name accepted.
pub const MAX_NAME: usize = 256;
/// Appends queued for the writer before appenders wait (backpressure).
const QUEUE: usize = 16 * 1024;
/// Points per compacted chunk: small enough that a short range query
/// decodes little, large enough that headers and index entries vanish.
const COMPACT_CHUNK: usize = 16 * 1024;

/// How the store behaves; see the field docs for the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// `true` (default): each group commit is `fdatasync`ed before its
    /// appends complete. `false`: written at once, synced every second.
    pub durable: bool,
    /// Width of a partition (default one day). Fixed when the store is
    /// created; a different value later is ignored with a warning.
    pub partition: Duration,
    /// Flush heads to partition files at least this often (default 10 min).
    pub flush_interval: Duration,
    /// ...or when the WAL since the last checkpoint exceeds this (default
    /// 256 MiB), which bounds both head memory and replay time.
    pub flush_wal_bytes: u64,
    /// A partition is compacted once its end is this far in the past
    /// (default 1 h, leaving room for late points).
    pub compact_after: Duration,
    pub retention: Retention,
    /// Appends are refused (as [`TsdbError::DiskFull`]) while the file
    /// system has less than this free (default 64 MiB).
    pub min_free_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durable: true,
            partition: Duration::from_secs(86_400),
            flush_interval: Duration::from_secs(600),
            flush_wal_bytes: 256 << 20,
            compact_after: Duration::from_secs(3600),
            retention: Retention::default(),
            min_free_bytes: 64 << 20,
        }
    }
}

/// Completion of an append: resolves once the points are in the WAL
/// (fsynced in durable mode) and visible to queries.
#[must_use = "an append is only durable once its ticket resolves"]
pub struct Ticket(oneshot::Receiver<Result<(), TsdbError>>);

impl Ticket {
    pub async fn wait(self) -> Result<(), TsdbError> {
        self.0.await.unwrap_or(Err(TsdbError::Closed))
    }

    /// For threads outside an async runtime (benchmarks, tools).
    pub fn wait_blocking(self) -> Result<(), TsdbError> {
        self.0.blocking_recv().unwrap_or(Err(TsdbError::Closed))
    }

    /// A ticket and the [`Completion`] that resolves it, for other
    /// [`crate::TimeSeriesStore`] backends, whose writers complete appends
    /// the same way the WAL thread does.
    pub fn pending() -> (Completion, Ticket) {
        let (tx, rx) = oneshot::channel();
        (Completion(tx), Ticket(rx))
    }

    /// A ticket that has already resolved (nothing was queued).
    pub fn ready(result: Result<(), TsdbError>) -> Ticket {
        let (done, ticket) = Ticket::pending();
        done.complete(result);
        ticket
    }
}

/// The writer's side of a [`Ticket`]. Dropping it unresolved resolves the
/// ticket as [`TsdbError::Closed`].
pub struct Completion(oneshot::Sender<Result<(), TsdbError>>);

impl Completion {
    pub fn complete(self, result: Result<(), TsdbError>) {
        // The appender may have stopped waiting; nothing to tell then.
        let _ = self.0.send(result);
    }
}

/// Result of [`Tsdb::append`].
pub struct Appended {
    pub ticket: Ticket,
    pub accepted: usize,
    /// Points refused before queueing, with the reason (a value of the
    /// wrong kind for its series, a bad name).
    pub rejected: Vec<(String, String)>,
}

enum Cmd {
    Def(SeriesId, SeriesMeta),
    Append {
        points: Vec<(SeriesId, i64, Value)>,
        done: oneshot::Sender<Result<(), TsdbError>>,
    },
    /// Start a new WAL segment and freeze the heads.
    Rotate(mpsc::Sender<std::io::Result<(u64, Option<Frozen>)>>),
    Stop,
}

pub(crate) struct State {
    pub heads: Heads,
    pub frozen: Vec<Frozen>,
    pub latest: LatestTable,
    pub parts: BTreeMap<i64, PartView>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub points_appended: AtomicU64,
    pub points_rejected: AtomicU64,
    pub wal_commits: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub wal_since_checkpoint: AtomicU64,
    pub flushes: AtomicU64,
    pub compactions: AtomicU64,
    pub write_errors: AtomicU64,
    pub disk_bytes: AtomicU64,
    /// See `Stats::compaction_peak_bytes`.
    pub compaction_peak_bytes: AtomicU64,
}

enum MaintReq {
    Flush,
    Compact,
}

type MaintCall = (MaintReq, mpsc::Sender<Result<(), TsdbError>>);

/// A partition's new view (when the flush created it) and its new segments.
type Installed = (i64, Option<PartView>, Vec<(SeriesId, crate::part::Segment)>);

pub(crate) struct Shared {
    pub dir: PathBuf,
    pub opts: Options,
    pub partition_ms: i64,
    pub series: RwLock<SeriesIndex>,
    pub state: RwLock<State>,
    pub retention: RwLock<Retention>,
    tx: SyncSender<Cmd>,
    pub counters: Counters,
    pub disk_full: AtomicBool,
    /// `Options::min_free_bytes`, changeable while running
    /// ([`Tsdb::set_min_free_bytes`]).
    pub min_free: std::sync::atomic::AtomicU64,
    stopping: AtomicBool,
    maint: Mutex<Vec<MaintCall>>,
    maint_cv: Condvar,
}

impl Shared {
    pub fn part_of(&self, ts: i64) -> i64 {
        ts.div_euclid(self.partition_ms)
    }
}

/// The embedded time-series store. Cheap to share behind an `Arc`.
pub struct Tsdb {
    pub(crate) shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Free bytes of the file system holding `dir`.
/// Segments per series at which a partition is compacted even while it is
/// still being written (with the default 10-minute flush: every 80 minutes,
/// rewriting the day so far into one segment per series).
const OPEN_FRAGMENTS: usize = 8;

fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Tsdb {
    /// Open (creating) the store in `dir` and recover: committed partitions,
    /// series definitions, then the WAL since the last checkpoint.
    pub fn open(dir: &Path, opts: Options) -> Result<Tsdb, TsdbError> {
        let min_free_bytes = opts.min_free_bytes;
        let wal_dir = dir.join("wal");
        let parts_dir = dir.join("parts");
        std::fs::create_dir_all(&wal_dir)?;
        std::fs::create_dir_all(&parts_dir)?;
        let partition_ms = partition_ms(dir, &opts)?;
        let (flush_id, wal_start) = read_checkpoint(dir)?;

        let mut index = SeriesIndex::default();
        let series_log = SeriesLog::open(&dir.join("series.log"), &mut index)?;

        let mut writers = HashMap::new();
        let mut parts = BTreeMap::new();
        for id in crate::part::list(&parts_dir)? {
            let (w, view) = PartWriter::open(&parts_dir, id, flush_id)?;
            writers.insert(id, w);
            parts.insert(id, view);
        }

        let mut heads = Heads::default();
        let mut latest = LatestTable::default();
        let mut next_seq = wal_start;
        let mut replayed = 0u64;
        for (seq, path) in wal::segments(&wal_dir)? {
            if seq < wal_start {
                std::fs::remove_file(&path)?;
                continue;
            }
            wal::replay(&path, &mut index, |wal::Replayed::Points(pts)| {
                for (id, ts, v) in pts {
                    heads.push(id, ts.div_euclid(partition_ms), ts, &v);
                    latest.offer(id, ts, &v);
                    replayed += 1;
                }
            })?;
            next_seq = seq + 1;
        }
        if replayed > 0 {
            tracing::info!(points = replayed, "replayed the time-series WAL");
        }
        let wal = Wal::create(&wal_dir, next_seq)?;

        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let mut retention = opts.retention.clone();
        if let Some(rules) = load_rules(dir)? {
            retention.rules = rules;
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts,
            partition_ms,
            series: RwLock::new(index),
            state: RwLock::new(State {
                heads,
                frozen: Vec::new(),
                latest,
                parts,
            }),
            retention: RwLock::new(retention),
            tx,
            counters: Counters::default(),
            disk_full: AtomicBool::new(false),
            min_free: std::sync::atomic::AtomicU64::new(min_free_bytes),
            stopping: AtomicBool::new(false),
            maint: Mutex::new(Vec::new()),
            maint_cv: Condvar::new(),
        });
        let w = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tsdb-wal".into())
                .spawn(move || writer_loop(&shared, rx, wal))?
        };
        let m = {
            let shared = shared.clone();
            let mut maint = Maintenance {
                shared,
                writers,
                series_log,
                flush_id,
                last_flush: Instant::now(),
                last_compact: Instant::now() - Duration::from_secs(3600),
                pending: Vec::new(),
                poisoned: false,
            };
            std::thread::Builder::new()
                .name("tsdb-maint".into())
                .spawn(move || {
                    // Flushes and compactions are bulk work: lower priority
                    // than message handling and the WAL writer.
                    let _ =
                        rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
                    maint.run()
                })?
        };
        Ok(Tsdb {
            shared,
            threads: Mutex::new(vec![w, m]),
        })
    }

    /// Change the free space the store keeps (`Options::min_free_bytes`);
    /// the store reopens for writes, or closes, within a fraction of a
    /// second.
    pub fn set_min_free_bytes(&self, bytes: u64) {
        self.shared.min_free.store(bytes, Ordering::Relaxed);
    }

    /// Queue points of one device; see [`Appended`]. Fails as a whole only
    /// when the store cannot take writes (disk full, closed).
    pub fn append(
        &self,
        tenant: &str,
        device: &str,
        points: &[InPoint<'_>],
    ) -> Result<Appended, TsdbError> {
        let sh = &self.shared;
        if sh.disk_full.load(Ordering::Relaxed) {
            return Err(TsdbError::DiskFull {
                min_free: sh.min_free.load(Ordering::Relaxed),
            });
        }
        for (what, s) in [("tenant", tenant), ("device", device)] {
            if s.is_empty() || s.len() > MAX_NAME {
                return Err(TsdbError::Invalid(format!(
                    "{what} must be 1 to {MAX_NAME} bytes"
                )));
            }
        }
        let mut out = Vec::with_capacity(points.len());
        let mut rejected = Vec::new();
        let mut missing = false;
        {
            let idx = sh.series.read();
            let dev = idx.device(tenant, device);
            for p in points {
                match dev.and_then(|m| m.get(p.metric)) {
                    Some(&id) => {
                        let kind = idx.metas[id as usize].kind;
                        match fit(kind, &p.value) {
                            Some(v) => out.push((id, p.ts_ms, v)),
                            None => rejected.push(mismatch(p, kind)),
                        }
                    }
                    None => {
                        missing = true;
                        break;
                    }
                }
            }
        }
        if missing {
            out.clear();
            rejected.clear();
            let mut idx = sh.series.write();
            for p in points {
                if p.metric.is_empty() || p.metric.len() > MAX_NAME {
                    rejected.push((
                        p.metric.to_string(),
                        format!("metric names must be 1 to {MAX_NAME} bytes"),
                    ));
                    continue;
                }
                let id = match idx.get(tenant, device, p.metric) {
                    Some(id) => id,
                    None => {
                        let id = idx.len() as SeriesId;
                        let meta = SeriesMeta {
                            key: SeriesKey {
                                tenant: tenant.into(),
                                device: device.into(),
                                metric: p.metric.into(),
                            },
                            kind: p.value.kind(),
                        };
                        if idx.insert(id, meta.key.clone(), meta.kind).is_err() {
                            continue;
                        }
                        // Sent under the write lock: the definition reaches
                        // the WAL before any point that uses the id.
                        sh.tx
                            .send(Cmd::Def(id, meta))
                            .map_err(|_| TsdbError::Closed)?;
                        id
                    }
                };
                let kind = idx.metas[id as usize].kind;
                match fit(kind, &p.value) {
                    Some(v) => out.push((id, p.ts_ms, v)),
                    None => rejected.push(mismatch(p, kind)),
                }
            }
        }
        sh.counters
            .points_rejected
            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        let accepted = out.len();
        if out.is_empty() {
            let _ = done.send(Ok(()));
        } else {
            sh.tx
                .send(Cmd::Append { points: out, done })
                .map_err(|_| TsdbError::Closed)?;
        }
        Ok(Appended {
            ticket: Ticket(rx),
            accepted,
            rejected,
        })
    }

    /// Flush every head to partition files and checkpoint (normally done
    /// by the maintenance thread on its own schedule).
    pub fn flush(&self) -> Result<(), TsdbError> {
        self.maint_request(MaintReq::Flush)
    }

    /// Flush, then compact every partition that has more than one segment
    /// for some series and apply retention, whatever the partitions' age.
    pub fn compact(&self) -> Result<(), TsdbError> {
        self.maint_request(MaintReq::Compact)
    }

    fn maint_request(&self, req: MaintReq) -> Result<(), TsdbError> {
        let (tx, rx) = mpsc::channel();
        self.shared.maint.lock().push((req, tx));
        self.shared.maint_cv.notify_all();
        rx.recv().unwrap_or(Err(TsdbError::Closed))
    }

    /// Replace the retention (applied at the next compaction pass; queries
    /// stop returning expired points at once). The rules are saved in the
    /// store and survive a restart; the default comes from [`Options`].
    pub fn set_retention(&self, r: Retention) -> Result<(), TsdbError> {
        r.validate()?;
        let mut text = String::new();
        for rule in &r.rules {
            let keep = rule
                .keep
                .map(|k| k.as_millis().to_string())
                .unwrap_or_else(|| "forever".into());
            text.push_str(&format!(
                "{}\t{}\t{}\n",
                rule.tenant.as_deref().unwrap_or(""),
                rule.metric.as_deref().unwrap_or(""),
                keep
            ));
        }
        write_atomic(&self.shared.dir, "retention.rules", text.as_bytes())?;
        *self.shared.retention.write() = r;
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        self.shared.retention.read().clone()
    }

    pub fn stats(&self) -> Stats {
        let sh = &self.shared;
        let c = &sh.counters;
        let st = sh.state.read();
        Stats {
            series: sh.series.read().len() as u64,
            points_appended: c.points_appended.load(Ordering::Relaxed),
            points_rejected: c.points_rejected.load(Ordering::Relaxed),
            wal_commits: c.wal_commits.load(Ordering::Relaxed),
            wal_bytes: c.wal_bytes.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            partitions: st.parts.len() as u64,
            head_points: st.heads.points + st.frozen.iter().map(|f| f.points).sum::<u64>(),
            head_bytes: (st.heads.heap_bytes()
                + st.frozen.iter().map(|f| f.heap_bytes()).sum::<usize>())
                as u64,
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            disk_full: sh.disk_full.load(Ordering::Relaxed),
            compaction_peak_bytes: c.compaction_peak_bytes.load(Ordering::Relaxed),
        }
    }

    /// Bytes of the partition files (sealed data only), measured now.
    pub fn sealed_bytes(&self) -> u64 {
        dir_size(&self.shared.dir.join("parts"))
    }

    /// Stop the threads after committing everything queued. Idempotent;
    /// also done on drop.
    pub fn close(&self) {
        let threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.tx.send(Cmd::Stop);
        self.shared.maint_cv.notify_all();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Tsdb {
    fn drop(&mut self) {
        self.close();
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A value as its series stores it, or `None` when the kinds clash.
fn fit(kind: Kind, v: &Value) -> Option<Value> {
    kind.accepts(v).then(|| v.clone())
}

fn mismatch(p: &InPoint<'_>, kind: Kind) -> (String, String) {
    (p.metric.to_string(), kind.refusal(p.metric, &p.value))
}

fn partition_ms(dir: &Path, opts: &Options) -> Result<i64, TsdbError> {
    let path = dir.join("tsdb.meta");
    let wanted = opts.partition.as_millis().clamp(60_000, i64::MAX as u128) as i64;
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let stored = s
                .lines()
                .find_map(|l| l.strip_prefix("partition_ms="))
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    TsdbError::Corrupt(format!("{}: no partition_ms", path.display()))
                })?;
            if stored != wanted {
                tracing::warn!(
                    stored,
                    wanted,
                    "the store's partition width is fixed at creation; keeping the stored one"
                );
            }
            Ok(stored)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(
                dir,
                "tsdb.meta",
                format!("partition_ms={wanted}\n").as_bytes(),
            )?;
            Ok(wanted)
        }
        Err(e) => Err(e.into()),
    }
}

/// The saved retention rules, if any (`tenant TAB metric TAB keep_ms`).
fn load_rules(dir: &Path) -> Result<Option<Vec<crate::model::RetentionRule>>, TsdbError> {
    let path = dir.join("retention.rules");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut rules = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut f = line.split('\t');
        let (Some(t), Some(m), Some(k), None) = (f.next(), f.next(), f.next(), f.next()) else {
            return Err(TsdbError::Corrupt(format!(
                "{}: bad line {line:?}",
                path.display()
            )));
        };
        let keep = match k {
            "forever" => None,
            ms => Some(Duration::from_millis(ms.parse().map_err(|_| {
                TsdbError::Corrupt(format!("{}: bad duration {ms:?}", path.display()))
            })?)),
        };
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        rules.push(crate::model::RetentionRule {
            tenant: opt(t),
            metric: opt(m),
            keep,
        });
    }
    Ok(Some(rules))
}

fn read_checkpoint(dir: &Path) -> Result<(u64, u64), TsdbError> {
    let path = dir.join("checkpoint");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>());
            match (it.next(), it.next()) {
                (Some(Ok(f)), Some(Ok(w))) => Ok((f, w)),
                _ => Err(TsdbError::Corrupt(format!(
                    "{}: expected `flush_id wal_start`",
                    path.display()
                ))),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(e.into()),
    }
}

/// Replace `dir/name` atomically (write, fsync, rename, fsync the dir).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    wal::sync_dir(dir)
}

// ---------------------------------------------------------------- writer

struct PendingAppend {
    points: Vec<(SeriesId, i64, Value)>,
    done: oneshot::Sender<Result<(), TsdbError>>,
}

struct Writer<'a> {
    sh: &'a Shared,
    wal: Wal,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// Definitions not yet in the WAL (kept across a failed write).
    defs: Vec<(SeriesId, SeriesMeta)>,
    last_sync: Instant,
    last_space_check: Instant,
    dirty: bool,
}

fn writer_loop(sh: &Shared, rx: Receiver<Cmd>, wal: Wal) {
    let mut w = Writer {
        sh,
        wal,
        buf: Vec::with_capacity(1 << 20),
        scratch: Vec::new(),
        defs: Vec::new(),
        last_sync: Instant::now(),
        last_space_check: Instant::now() - Duration::from_secs(10),
        dirty: false,
    };
    let mut group: Vec<PendingAppend> = Vec::new();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                w.lazy_sync();
                // While full, `append` refuses before anything reaches this
                // thread: look at the free space here, or the store would
                // stay closed after space is freed (found by the chaos
                // harness: refused until a restart).
                if sh.disk_full.load(Ordering::Relaxed) {
                    w.check_space();
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut next = Some(first);
        let mut points = 0usize;
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Def(id, meta) => w.defs.push((id, meta)),
                Cmd::Append { points: p, done } => {
                    points += p.len();
                    group.push(PendingAppend { points: p, done });
                }
                Cmd::Rotate(reply) => {
                    w.commit(&mut group);
                    let r = w.wal.rotate().map(|seq| {
                        sh.counters.wal_since_checkpoint.store(0, Ordering::Relaxed);
                        let mut st = sh.state.write();
                        let heads = std::mem::take(&mut st.heads);
                        let frozen = (heads.points > 0).then(|| {
                            let f = Arc::new(heads);
                            st.frozen.push(f.clone());
                            f
                        });
                        (seq, frozen)
                    });
                    let _ = reply.send(r);
                }
                Cmd::Stop => {
                    w.commit(&mut group);
                    if let Err(e) = w.wal.sync() {
                        tracing::error!(error = %e, "cannot sync the time-series WAL at shutdown");
                    }
                    return;
                }
            }
            // Take what else is queued, up to a bound that keeps one
            // group's latency and buffer small.
            if points < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        w.commit(&mut group);
    }
}

impl Writer<'_> {
    fn lazy_sync(&mut self) {
        if self.dirty && self.last_sync.elapsed() >= Duration::from_secs(1) {
            if let Err(e) = self.wal.sync() {
                tracing::error!(error = %e, "cannot sync the time-series WAL");
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    fn check_space(&mut self) {
        let full = self.sh.disk_full.load(Ordering::Relaxed);
        // Re-check often while full (to notice freed space), else once a second.
        let every = if full {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        };
        if self.last_space_check.elapsed() < every {
            return;
        }
        self.last_space_check = Instant::now();
        if let Some(free) = free_bytes(&self.sh.dir) {
            let min_free = self.sh.min_free.load(Ordering::Relaxed);
            let now_full = free < min_free;
            if now_full != full {
                if now_full {
                    tracing::error!(
                        free,
                        min_free,
                        "disk almost full: the time-series store refuses new points"
                    );
                } else {
                    tracing::info!(free, "disk space available again: accepting points");
                }
                self.sh.disk_full.store(now_full, Ordering::Relaxed);
            }
        }
    }

    fn fail(&self, group: &mut Vec<PendingAppend>, err: TsdbError) {
        for p in group.drain(..) {
            let _ = p.done.send(Err(err.clone()));
        }
    }

    fn commit(&mut self, group: &mut Vec<PendingAppend>) {
        if group.is_empty() && self.defs.is_empty() {
            return;
        }
        let sh = self.sh;
        self.check_space();
        let min_free = sh.min_free.load(Ordering::Relaxed);
        if sh.disk_full.load(Ordering::Relaxed) {
            self.fail(group, TsdbError::DiskFull { min_free });
            return;
        }
        self.buf.clear();
        for (id, meta) in &self.defs {
            self.scratch.clear();
            self.scratch.push(wal::REC_DEF);
            encode_def(&mut self.scratch, *id, meta);
            crate::codec::frame(&mut self.buf, &self.scratch);
        }
        for p in group.iter() {
            encode_points(&mut self.buf, &mut self.scratch, &p.points);
        }
        let written = self.wal.append(&self.buf).and_then(|()| {
            if sh.opts.durable {
                self.wal.sync()
            } else {
                self.dirty = true;
                Ok(())
            }
        });
        if let Err(e) = written {
            sh.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            let err = if is_disk_full(&e) {
                sh.disk_full.store(true, Ordering::Relaxed);
                self.last_space_check = Instant::now();
                tracing::error!("disk full: the time-series store refuses new points");
                TsdbError::DiskFull { min_free }
            } else {
                tracing::error!(error = %e, "cannot write the time-series WAL");
                TsdbError::Io(e.to_string())
            };
            self.fail(group, err);
            return;
        }
        self.defs.clear();
        if !sh.opts.durable {
            self.lazy_sync();
        }
        let c = &sh.counters;
        c.wal_commits.fetch_add(1, Ordering::Relaxed);
        c.wal_bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        let since = c
            .wal_since_checkpoint
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed)
            + self.buf.len() as u64;
        let mut n = 0u64;
        {
            let mut st = sh.state.write();
            let st = &mut *st;
            for p in group.iter() {
                for (id, ts, v) in &p.points {
                    st.heads.push(*id, sh.part_of(*ts), *ts, v);
                    st.latest.offer(*id, *ts, v);
                }
                n += p.points.len() as u64;
            }
        }
        c.points_appended.fetch_add(n, Ordering::Relaxed);
        for p in group.drain(..) {
            let _ = p.done.send(Ok(()));
        }
        if since >= sh.opts.flush_wal_bytes {
            sh.maint_cv.notify_all();
        }
    }
}

// ----------------------------------------------------------- maintenance

struct Maintenance {
    shared: Arc<Shared>,
    writers: HashMap<i64, PartWriter>,
    series_log: SeriesLog,
    /// Last committed flush.
    flush_id: u64,
    last_flush: Instant,
    last_compact: Instant,
    /// Frozen heads whose flush failed, retried with the next one.
    pending: Vec<Frozen>,
    /// A failed flush could not be rolled back: no more flushes until a
    /// restart cuts the uncommitted records (the WAL keeps everything).
    poisoned: bool,
}

impl Maintenance {
    fn run(&mut self) {
        loop {
            let reqs = {
                let mut m = self.shared.maint.lock();
                if m.is_empty() && !self.shared.stopping.load(Ordering::SeqCst) {
                    self.shared
                        .maint_cv
                        .wait_for(&mut m, Duration::from_millis(1000));
                }
                std::mem::take(&mut *m)
            };
            if self.shared.stopping.load(Ordering::SeqCst) {
                for (_, tx) in reqs {
                    let _ = tx.send(Err(TsdbError::Closed));
                }
                return;
            }
            let mut flushed = false;
            for (req, tx) in reqs {
                let r = match req {
                    MaintReq::Flush => {
                        let r = self.flush();
                        flushed |= r.is_ok();
                        r
                    }
                    MaintReq::Compact => self.flush().and_then(|()| self.compact(true)),
                };
                let _ = tx.send(r);
            }
            let sh = &self.shared;
            let wal_big =
                sh.counters.wal_since_checkpoint.load(Ordering::Relaxed) >= sh.opts.flush_wal_bytes;
            let due = self.last_flush.elapsed() >= sh.opts.flush_interval;
            if wal_big || due || !self.pending.is_empty() {
                match self.flush() {
                    Ok(()) => flushed = true,
                    Err(e) => {
                        tracing::error!(error = %e, "time-series flush failed; retrying later")
                    }
                }
            }
            if self.last_compact.elapsed() >= Duration::from_secs(60)
                || (flushed && self.fragmented())
            {
                if let Err(e) = self.compact(false) {
                    tracing::error!(error = %e, "time-series compaction failed");
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), TsdbError> {
        if self.poisoned {
            return Err(TsdbError::Io(
                "an earlier flush failed and could not be undone; restart to recover from the WAL"
                    .into(),
            ));
        }
        self.last_flush = Instant::now();
        let sh = self.shared.clone();
        let (tx, rx) = mpsc::channel();
        sh.tx.send(Cmd::Rotate(tx)).map_err(|_| TsdbError::Closed)?;
        let (wal_start, frozen) = rx.recv().map_err(|_| TsdbError::Closed)??;
        if let Some(f) = frozen {
            self.pending.push(f);
        }
        let flush_id = self.flush_id + 1;
        // Group the frozen heads by partition.
        let mut by_part: BTreeMap<i64, BTreeMap<SeriesId, Vec<ChunkSrc>>> = BTreeMap::new();
        for f in &self.pending {
            for (sid, parts) in f.series.iter().enumerate() {
                for hp in parts {
                    by_part
                        .entry(hp.part)
                        .or_default()
                        .entry(sid as SeriesId)
                        .or_default()
                        .push(ChunkSrc {
                            bytes: hp.enc.snapshot(),
                            min_ts: hp.min_ts,
                            max_ts: hp.max_ts,
                            count: hp.count,
                        });
                }
            }
        }
        let root = sh.dir.join("parts");
        let mut installed: Vec<Installed> = Vec::new();
        let mut marks: Vec<(i64, u64, u64)> = Vec::new();
        let result = (|| -> Result<(), TsdbError> {
            for (pid, series) in by_part {
                let mut new_view = None;
                if !self.writers.contains_key(&pid) {
                    let (w, view) = PartWriter::open(&root, pid, self.flush_id)?;
                    self.writers.insert(pid, w);
                    new_view = Some(view);
                }
                let writes = series
                    .into_iter()
                    .map(|(sid, srcs)| series_write(sid, srcs, false, &mut Held::default()))
                    .collect::<Result<Vec<_>, _>>()?;
                let w = self.writers.get_mut(&pid).ok_or(TsdbError::Closed)?;
                marks.push((pid, w.data_len, w.index_len()?));
                let entries = w.append(flush_id, writes)?;
                installed.push((pid, new_view, entries));
            }
            let idx = sh.series.read();
            self.series_log.persist(&idx)?;
            drop(idx);
            write_atomic(
                &sh.dir,
                "checkpoint",
                format!("{flush_id} {wal_start}\n").as_bytes(),
            )?;
            Ok(())
        })();
        if let Err(e) = result {
            sh.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            for (pid, data_len, index_len) in marks {
                if let Some(w) = self.writers.get_mut(&pid) {
                    if w.rollback(data_len, index_len).is_err() {
                        self.poisoned = true;
                    }
                }
            }
            return Err(e);
        }
        self.flush_id = flush_id;
        {
            let mut st = sh.state.write();
            for (pid, view, entries) in installed {
                if let Some(view) = view {
                    st.parts.entry(pid).or_insert(view);
                }
                let Some(v) = st.parts.get_mut(&pid) else {
                    tracing::error!(
                        partition = pid,
                        "flushed into a partition that is not loaded"
                    );
                    continue;
                };
                for (sid, seg) in entries {
                    v.segments += 1;
                    v.index.entry(sid).or_default().push(seg);
                }
            }
            let done = std::mem::take(&mut self.pending);
            st.frozen
                .retain(|f| !done.iter().any(|d| Arc::ptr_eq(d, f)));
        }
        for (seq, path) in wal::segments(&sh.dir.join("wal"))? {
            if seq < wal_start {
                std::fs::remove_file(path)?;
            }
        }
        sh.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.update_disk_bytes();
        Ok(())
    }

    fn update_disk_bytes(&self) {
        let sh = &self.shared;
        let parts: u64 = self.writers.values().map(|w| w.disk_bytes()).sum();
        let wal = dir_size(&sh.dir.join("wal"));
        sh.counters.disk_bytes.store(parts + wal, Ordering::Relaxed);
    }

    /// Whether a partition has [`OPEN_FRAGMENTS`] segments per series or
    /// more: each flush adds one per series to the partition it writes, the
    /// open one included, and the in-memory index (and every read of the
    /// day) grows with them until the partition is compacted.
    fn fragmented(&self) -> bool {
        let st = self.shared.state.read();
        st.parts
            .values()
            .any(|v| v.segments >= OPEN_FRAGMENTS * v.index.len().max(1))
    }

    /// Compact closed partitions (all of them when `force`), any partition
    /// with [`OPEN_FRAGMENTS`] segments per series (the open one too: a
    /// long-running server's memory must not grow with every flush until
    /// the day ends — found by the soak harness, about 130 bytes per series
    /// and flush), and apply retention.
    ///
    /// A partition is rewritten one series at a time into its next
    /// generation file ([`PartWriter::begin_rewrite`]): the memory it takes
    /// is one series' worth, whatever the partition's size (gathering the
    /// whole partition first made the soak's RSS jump by the size of the
    /// day so far, up to 778 MiB, at every compaction of the open day).
    fn compact(&mut self, force: bool) -> Result<(), TsdbError> {
        self.last_compact = Instant::now();
        let sh = self.shared.clone();
        let now = now_ms();
        let retention = sh.retention.read().clone();
        // Whole partitions past the longest retention go first.
        if let Some(longest) = retention.longest() {
            let cutoff = now - longest.as_millis() as i64;
            let expired: Vec<i64> = self
                .writers
                .keys()
                .copied()
                .filter(|p| (p + 1) * sh.partition_ms <= cutoff)
                .collect();
            for pid in expired {
                sh.state.write().parts.remove(&pid);
                if let Some(w) = self.writers.remove(&pid) {
                    std::fs::remove_dir_all(&w.dir)?;
                    tracing::info!(partition = pid, "dropped an expired partition");
                }
            }
        }
        let candidates: Vec<i64> = {
            let st = sh.state.read();
            st.parts
                .iter()
                .filter(|(pid, v)| {
                    let end = (*pid + 1) * sh.partition_ms;
                    let closed = end + sh.opts.compact_after.as_millis() as i64 <= now;
                    let fragmented = v.segments > v.index.len();
                    let crowded = v.segments >= OPEN_FRAGMENTS * v.index.len().max(1);
                    let expiring = self.has_expired_series(**pid, v, &retention, now);
                    expiring || crowded || (fragmented && (force || closed))
                })
                .map(|(p, _)| *p)
                .collect()
        };
        for pid in candidates {
            // Only this thread changes a partition's view, so the clone
            // (the small index and the file handle) stays current while
            // the partition is rewritten; queries keep reading the old
            // generation through their own `Arc` until the swap below.
            let Some(view) = sh.state.read().parts.get(&pid).cloned() else {
                continue;
            };
            let Some(w) = self.writers.get_mut(&pid) else {
                continue;
            };
            let end = (pid + 1) * sh.partition_ms;
            // The series kept and their kinds, in id order (the new data
            // file's layout), decided under one short lock.
            let plan: Vec<(SeriesId, Kind)> = {
                let idx = sh.series.read();
                let mut plan: Vec<_> = view
                    .index
                    .keys()
                    .filter_map(|sid| {
                        let meta = idx.meta(*sid);
                        let expired = meta
                            .and_then(|m| retention.keep_for(&m.key))
                            .is_some_and(|keep| end <= now - keep.as_millis() as i64);
                        (!expired).then(|| (*sid, meta.map_or(Kind::Float, |m| m.kind)))
                    })
                    .collect();
                plan.sort_unstable_by_key(|p| p.0);
                plan
            };
            // One series at a time: read its chunks, merge, write, drop.
            let mut held = Held::default();
            let mut rw = w.begin_rewrite()?;
            for (sid, kind) in plan {
                let mut srcs = Vec::new();
                for seg in view.index.get(&sid).into_iter().flatten() {
                    for c in &seg.chunks {
                        let bytes = view.files.read(c.block)?;
                        srcs.push(ChunkSrc {
                            bytes: if kind == Kind::Text {
                                ChunkBytes::Text(bytes)
                            } else {
                                ChunkBytes::Num(bytes)
                            },
                            min_ts: c.min_ts,
                            max_ts: c.max_ts,
                            count: c.count,
                        });
                    }
                }
                let write = series_write(sid, srcs, true, &mut held)?;
                rw.push(&write)?;
            }
            sh.counters
                .compaction_peak_bytes
                .fetch_max(held.peak as u64, Ordering::Relaxed);
            let new_view = w.finish_rewrite(rw, self.flush_id)?;
            sh.state.write().parts.insert(pid, new_view);
            sh.counters.compactions.fetch_add(1, Ordering::Relaxed);
        }
        self.update_disk_bytes();
        Ok(())
    }

    fn has_expired_series(&self, pid: i64, v: &PartView, r: &Retention, now: i64) -> bool {
        if r.rules.is_empty() && r.default.is_none() {
            return false;
        }
        let end = (pid + 1) * self.shared.partition_ms;
        let idx = self.shared.series.read();
        v.index.keys().any(|sid| {
            idx.meta(*sid)
                .and_then(|m| r.keep_for(&m.key))
                .is_some_and(|keep| end <= now - keep.as_millis() as i64)
        })
    }
}

/// The peak of the data a compaction holds in memory at once: the chunks
/// read, the decoded points, the rollup rows and the encoded output of the
/// series being rewritten (blobs go straight to the new file, so nothing
/// else accumulates). Reported as `Stats::compaction_peak_bytes`, so a test
/// can prove compaction memory follows the largest series, not the
/// partition. The per-series index (some 30 bytes a chunk) is not counted.
#[derive(Default)]
struct Held {
    peak: usize,
}

impl Held {
    fn observe(&mut self, bytes: usize) {
        self.peak = self.peak.max(bytes);
    }
}

struct ChunkSrc {
    bytes: ChunkBytes,
    min_ts: i64,
    max_ts: i64,
    count: u32,
}

/// Build what one series writes into one partition: numeric points are
/// decoded, ordered by time (stable: equal timestamps keep arrival order)
/// and re-cut into chunks of [`COMPACT_CHUNK`] points with their rollups.
/// Text chunks are kept as they are on a flush (`merge == false`) and
/// merged the same way on compaction.
fn series_write(
    sid: SeriesId,
    srcs: Vec<ChunkSrc>,
    merge: bool,
    held: &mut Held,
) -> Result<SeriesWrite, TsdbError> {
    let src_bytes: usize = srcs.iter().map(|s| s.bytes.len()).sum();
    let corrupt = |e: String| TsdbError::Corrupt(format!("series {sid}: {e}"));
    let text = matches!(srcs.first().map(|s| &s.bytes), Some(ChunkBytes::Text(_)));
    if text {
        let mut chunks = Vec::new();
        if merge {
            let mut pts = Vec::new();
            for s in &srcs {
                if let ChunkBytes::Text(b) = &s.bytes {
                    pts.extend(crate::text::decode(b).ok_or_else(|| corrupt("text chunk".into()))?);
                }
            }
            pts.sort_by_key(|p| p.0);
            let pts_bytes = pts.capacity() * std::mem::size_of::<(i64, String)>()
                + pts.iter().map(|p| p.1.len()).sum::<usize>();
            for run in pts.chunks(COMPACT_CHUNK) {
                let mut e = crate::text::TextEncoder::default();
                for (t, s) in run {
                    e.push(*t, s);
                }
                let (min, max) = (run[0].0, run[run.len() - 1].0);
                chunks.push((e.snapshot(), min, max, run.len() as u32));
            }
            let out: usize = chunks.iter().map(|c| c.0.len()).sum();
            held.observe(src_bytes + pts_bytes + out);
        } else {
            for s in srcs {
                if let ChunkBytes::Text(b) = s.bytes {
                    chunks.push((b, s.min_ts, s.max_ts, s.count));
                }
            }
        }
        return Ok(SeriesWrite {
            id: sid,
            chunks,
            r1m: Vec::new(),
            r1h: Vec::new(),
        });
    }
    let mut pts: Vec<(i64, f64)> = Vec::with_capacity(srcs.iter().map(|s| s.count as usize).sum());
    for s in &srcs {
        if let ChunkBytes::Num(b) = &s.bytes {
            for p in crate::chunk::ChunkIter::new(b).map_err(|e| corrupt(e.to_string()))? {
                pts.push(p.map_err(|e| corrupt(e.to_string()))?);
            }
        }
    }
    // Stable: points with equal timestamps keep their arrival order.
    pts.sort_by_key(|p| p.0);
    let pts_bytes = pts.capacity() * std::mem::size_of::<(i64, f64)>();
    let rows = rollup::rows(&pts, MINUTE);
    held.observe(src_bytes + pts_bytes + rows.capacity() * std::mem::size_of::<(i64, Agg)>());
    let r1m = rollup::encode(&rows);
    drop(rows);
    let r1h = rollup::encode(&rollup::rows(&pts, HOUR));
    // Sealed numeric chunks are always re-cut in time order and encoded
    // in the smaller of the two chunk formats: a sorted chunk lets range
    // reads stop early, and decimal readings shrink by more than half.
    let chunks: Vec<_> = pts
        .chunks(COMPACT_CHUNK)
        .map(|run| {
            (
                crate::chunk::encode_best(run),
                run[0].0,
                run[run.len() - 1].0,
                run.len() as u32,
            )
        })
        .collect();
    let out = SeriesWrite {
        id: sid,
        chunks,
        r1m,
        r1h,
    };
    held.observe(src_bytes + pts_bytes + out.heap_bytes());
    Ok(out)
}
