//! Telemetry in PostgreSQL: [`PgTelemetryStore`] implements the embedded
//! store's [`TimeSeriesStore`] so that every node of a cluster reads every
//! node's points.
//!
//! # The model
//!
//! - **Series** are rows of `telemetry.series` (tenant, device, metric,
//!   kind), numbered by the database so that all nodes agree. Each node
//!   caches the ones it has seen (`catalog.rs`): an append checks a value's
//!   kind against the cache without a round trip, as the embedded store
//!   checks its index, because appends are called on the publishing
//!   connection's task and must not wait on the network.
//! - **Points** go to `telemetry.points`, partitioned by day (native
//!   declarative range partitioning on the millisecond timestamp), so
//!   retention drops whole tables instead of deleting rows
//!   (`partition.rs`). Days are created ahead by the maintenance thread
//!   and on demand by the writer; points far outside the current window
//!   land in a default partition, so a device with a broken clock cannot
//!   make thousands of tables.
//! - **Group commit** (`writer.rs`): one writer thread takes everything
//!   queued, writes it with one binary `COPY`, upserts the 1 min and 1 h
//!   rollups and the latest values of the batch in the same transaction,
//!   commits, and only then resolves the appenders' tickets:
//!   acknowledged = committed, as with the embedded store's `fdatasync`.
//! - **Queries** (`query.rs`) run on connections of their own, with the
//!   embedded store's semantics (paging cursor, retention floor, rollups
//!   for the whole minute/hour buckets inside a range).

mod catalog;
mod partition;
mod query;
mod writer;

use crate::connection::Connection;
use crate::error::{PgError, PgResult};
use crate::migrate::{migrate, use_schema, Steps};
use crate::url::PgUrl;
use catalog::Catalog;
use m2mhub_identity::sql::Migration;
use m2mhub_identity::RegistryError;
use m2mhub_tsdb::{
    AggQuery, AggSources, Appended, InPoint, Latest, RawPage, RawQuery, Retention, SeriesBuckets,
    SeriesInfo, Stats, TimeSeriesStore, TsdbError, MAX_NAME,
};
use parking_lot::{Mutex, RwLock};
use postgres::Client;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const SCHEMA: &str = "telemetry";

/// Appends queued for the writer before appenders wait (backpressure), as
/// in the embedded store.
const QUEUE: usize = 16 * 1024;

/// Connections serving queries, so an aggregate over a month does not hold
/// up a device page's latest values.
const READERS: usize = 2;

/// The tables. `points.seq` orders points of one series with equal
/// timestamps in the order they were committed (the raw cursor skips
/// them by count); the index leaves it out, since an incremental sort of
/// the few ties is cheaper than a wider index on every insert. The rollup
/// and latest tables are updated in place batch after batch: free space
/// in their pages (fillfactor) lets PostgreSQL update a row without
/// touching its index (a HOT update), and they have no index beyond the
/// key (retention deletes by series and bucket, which the key serves).
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "
    CREATE TABLE series (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant TEXT NOT NULL,
        device TEXT NOT NULL,
        metric TEXT NOT NULL,
        kind SMALLINT NOT NULL,
        created_ms BIGINT NOT NULL,
        UNIQUE (tenant, device, metric)
    );
    CREATE TABLE points (
        series_id INTEGER NOT NULL,
        ts BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        value DOUBLE PRECISION,
        text TEXT
    ) PARTITION BY RANGE (ts);
    CREATE INDEX points_series_ts ON points (series_id, ts);
    CREATE TABLE points_outside PARTITION OF points DEFAULT;
    CREATE SEQUENCE batch_seq;
    CREATE TABLE rollup_1m (
        series_id INTEGER NOT NULL,
        bucket BIGINT NOT NULL,
        count BIGINT NOT NULL,
        sum DOUBLE PRECISION NOT NULL,
        min DOUBLE PRECISION NOT NULL,
        max DOUBLE PRECISION NOT NULL,
        first_ts BIGINT NOT NULL,
        first DOUBLE PRECISION NOT NULL,
        last_ts BIGINT NOT NULL,
        last DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (series_id, bucket)
    ) WITH (fillfactor = 80);
    CREATE TABLE rollup_1h (LIKE rollup_1m INCLUDING ALL) WITH (fillfactor = 80);
    CREATE TABLE latest (
        series_id INTEGER PRIMARY KEY,
        ts BIGINT NOT NULL,
        value DOUBLE PRECISION,
        text TEXT
    ) WITH (fillfactor = 70);
    CREATE TABLE retention_rules (
        position INTEGER PRIMARY KEY,
        tenant TEXT,
        metric TEXT,
        keep_ms BIGINT
    );
    ",
}];

/// How the store behaves.
#[derive(Debug, Clone)]
pub struct PgTelemetryOptions {
    /// `true` (default): a ticket resolves once the commit is durable on the
    /// server. `false` (`telemetry.mode = fast`): commits with
    /// `synchronous_commit = off`, so the server may lose the last few
    /// hundred milliseconds in a crash, as the embedded fast mode may.
    pub durable: bool,
    /// The default retention; rules set later are kept in the database and
    /// shared by all nodes.
    pub retention: Retention,
    /// How often partitions are created ahead and retention applied.
    pub maintenance_interval: Duration,
}

impl Default for PgTelemetryOptions {
    fn default() -> Self {
        PgTelemetryOptions {
            durable: true,
            retention: Retention::default(),
            maintenance_interval: Duration::from_secs(60),
        }
    }
}

/// Node-local counters (the figures `stats` reports).
#[derive(Default)]
pub(crate) struct Counters {
    pub points_appended: AtomicU64,
    pub points_rejected: AtomicU64,
    pub commits: AtomicU64,
    pub bytes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Refreshed by the maintenance thread.
    pub series: AtomicU64,
    pub partitions: AtomicU64,
    pub disk_bytes: AtomicU64,
}

/// What the appenders, the writer, the maintenance thread and the queries
/// share.
pub(crate) struct Shared {
    pub catalog: RwLock<Catalog>,
    pub retention: RwLock<Retention>,
    pub counters: Counters,
}

/// The PostgreSQL time-series store; see the module documentation.
pub struct PgTelemetryStore {
    shared: Arc<Shared>,
    tx: SyncSender<writer::Cmd>,
    maint: SyncSender<partition::MaintCmd>,
    readers: Vec<Connection>,
    next_reader: AtomicUsize,
    closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A registry-shaped error (what the connection machinery speaks) as the
/// time-series store's.
pub(crate) fn tsdb_error(e: RegistryError) -> TsdbError {
    match e {
        RegistryError::Validation(m) => TsdbError::Invalid(m),
        RegistryError::Storage(m) => TsdbError::Io(m),
        other => TsdbError::Io(other.to_string()),
    }
}

fn setup_durable(c: &mut Client) -> PgResult<()> {
    use_schema(c, SCHEMA)
}

fn setup_fast(c: &mut Client) -> PgResult<()> {
    use_schema(c, SCHEMA)?;
    c.batch_execute("SET synchronous_commit TO off;")?;
    Ok(())
}

impl PgTelemetryStore {
    /// Connect, migrate the `telemetry` schema, load the series catalog and
    /// the retention rules, create today's partitions and start the writer
    /// and maintenance threads.
    pub fn open(url: &PgUrl, opts: PgTelemetryOptions) -> Result<PgTelemetryStore, TsdbError> {
        // What the first connection reads, handed back from its thread.
        type Loaded = (Catalog, Vec<m2mhub_tsdb::RetentionRule>);
        let loaded: Arc<Mutex<Option<Loaded>>> = Arc::default();
        let sink = loaded.clone();
        let maint_conn = Connection::open(
            "pg-telemetry-maint",
            url,
            move |c| {
                migrate(
                    c,
                    SCHEMA,
                    &[Steps {
                        domain: "telemetry",
                        migrations: MIGRATIONS,
                    }],
                )?;
                use_schema(c, SCHEMA)?;
                let catalog = Catalog::load(c)?;
                let rules = partition::load_rules(c)?;
                *sink.lock() = Some((catalog, rules));
                Ok(())
            },
            setup_durable,
        )
        .map_err(tsdb_error)?;
        let (catalog, rules) = loaded
            .lock()
            .take()
            .ok_or_else(|| TsdbError::Io("the telemetry catalog was not loaded".into()))?;
        let mut retention = opts.retention.clone();
        retention.rules = rules;
        let shared = Arc::new(Shared {
            catalog: RwLock::new(catalog),
            retention: RwLock::new(retention),
            counters: Counters::default(),
        });
        let mut readers = Vec::with_capacity(READERS);
        for i in 0..READERS {
            readers.push(
                Connection::open(
                    &format!("pg-telemetry-read-{i}"),
                    url,
                    |_| Ok(()),
                    setup_durable,
                )
                .map_err(tsdb_error)?,
            );
        }
        let (maint, maint_thread) = partition::start(maint_conn, shared.clone(), &opts)?;
        // Today's and the next days' partitions exist before the first append.
        partition::request(&maint, partition::MaintReq::Pass)?;
        let setup = if opts.durable {
            setup_durable
        } else {
            setup_fast
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let w = {
            let shared = shared.clone();
            let link = crate::connection::Link::new(url, setup);
            std::thread::Builder::new()
                .name("pg-telemetry-writer".into())
                .spawn(move || writer::run(link, &shared, rx))
                .map_err(|e| TsdbError::Io(e.to_string()))?
        };
        Ok(PgTelemetryStore {
            shared,
            tx,
            maint,
            readers,
            next_reader: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            threads: Mutex::new(vec![w, maint_thread]),
        })
    }

    /// A query connection, taken in turn.
    fn reader(&self) -> &Connection {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        &self.readers[i]
    }

    /// Run a query job on a reader connection.
    fn read<T, F>(&self, f: F) -> Result<T, TsdbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> PgResult<T> + Send + 'static,
    {
        self.reader().run(f).map_err(tsdb_error)
    }
}

impl TimeSeriesStore for PgTelemetryStore {
    fn append(
        &self,
        tenant: &str,
        device: &str,
        points: &[InPoint<'_>],
    ) -> Result<Appended, TsdbError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(TsdbError::Closed);
        }
        for (what, s) in [("tenant", tenant), ("device", device)] {
            if s.is_empty() || s.len() > MAX_NAME {
                return Err(TsdbError::Invalid(format!(
                    "{what} must be 1 to {MAX_NAME} bytes"
                )));
            }
        }
        let (batch, rejected) = self.shared.catalog_admit(tenant, device, points);
        let c = &self.shared.counters;
        c.points_rejected
            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
        let accepted = batch.points.len();
        let ticket = if accepted == 0 {
            m2mhub_tsdb::Ticket::ready(Ok(()))
        } else {
            let (done, ticket) = m2mhub_tsdb::Ticket::pending();
            self.tx
                .send(writer::Cmd::Append(writer::Pending { batch, done }))
                .map_err(|_| TsdbError::Closed)?;
            ticket
        };
        Ok(Appended {
            ticket,
            accepted,
            rejected,
        })
    }

    fn raw(&self, q: &RawQuery<'_>) -> Result<RawPage, TsdbError> {
        query::raw(self, q)
    }

    fn aggregate(&self, q: &AggQuery<'_>) -> Result<(Vec<SeriesBuckets>, AggSources), TsdbError> {
        query::aggregate(self, q)
    }

    fn latest(&self, tenant: &str, device: &str) -> Result<Vec<Latest>, TsdbError> {
        query::latest(self, tenant, device)
    }

    fn series(&self, tenant: &str, device: Option<&str>, metric: Option<&str>) -> Vec<SeriesInfo> {
        match query::series(self, tenant, device, metric) {
            Ok(s) => s,
            Err(e) => {
                // The trait has no error here (the embedded index is memory).
                tracing::warn!(error = %e, "cannot list telemetry series from PostgreSQL");
                Vec::new()
            }
        }
    }

    fn set_retention(&self, r: Retention) -> Result<(), TsdbError> {
        r.validate()?;
        let rules = r.rules.clone();
        self.read(move |c| partition::save_rules(c, &rules))?;
        *self.shared.retention.write() = r;
        Ok(())
    }

    fn retention(&self) -> Retention {
        self.shared.retention.read().clone()
    }

    fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            series: load(&c.series).max(self.shared.catalog.read().len() as u64),
            points_appended: load(&c.points_appended),
            points_rejected: load(&c.points_rejected),
            wal_commits: load(&c.commits),
            wal_bytes: load(&c.bytes),
            partitions: load(&c.partitions),
            disk_bytes: load(&c.disk_bytes),
            write_errors: load(&c.write_errors),
            ..Stats::default()
        }
    }

    /// Wait until everything appended so far is committed, then run a
    /// maintenance pass (partitions ahead, retention, figures).
    fn flush(&self) -> Result<(), TsdbError> {
        let (reply, done) = mpsc::sync_channel(1);
        self.tx
            .send(writer::Cmd::Barrier(reply))
            .map_err(|_| TsdbError::Closed)?;
        done.recv().map_err(|_| TsdbError::Closed)?;
        partition::request(&self.maint, partition::MaintReq::Pass)
    }

    fn close(&self) {
        let threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return;
        }
        self.closed.store(true, Ordering::SeqCst);
        // The writer commits what is queued before it stops.
        let _ = self.tx.send(writer::Cmd::Stop);
        let _ = self.maint.send(partition::MaintCmd::Stop);
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a PostgreSQL telemetry thread panicked");
            }
        }
    }
}

impl Drop for PgTelemetryStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl From<PgError> for TsdbError {
    fn from(e: PgError) -> Self {
        tsdb_error(e.into())
    }
}
