//! The boundary the platform programs against, so that another backend
//! (PostgreSQL/TimescaleDB) can replace the embedded engine.

use crate::engine::{Appended, Tsdb};
use crate::error::TsdbError;
use crate::model::{
    AggQuery, AggSources, InPoint, Latest, RawPage, RawQuery, Retention, SeriesBuckets, SeriesInfo,
    Stats,
};

/// A time-series backend.
pub trait TimeSeriesStore: Send + Sync + 'static {
    /// Queue the points of one device; the returned ticket resolves when
    /// they are durable (see [`crate::Ticket`]).
    fn append(
        &self,
        tenant: &str,
        device: &str,
        points: &[InPoint<'_>],
    ) -> Result<Appended, TsdbError>;
    fn raw(&self, q: &RawQuery<'_>) -> Result<RawPage, TsdbError>;
    fn aggregate(&self, q: &AggQuery<'_>) -> Result<(Vec<SeriesBuckets>, AggSources), TsdbError>;
    fn latest(&self, tenant: &str, device: &str) -> Result<Vec<Latest>, TsdbError>;
    fn series(&self, tenant: &str, device: Option<&str>, metric: Option<&str>) -> Vec<SeriesInfo>;
    fn set_retention(&self, r: Retention) -> Result<(), TsdbError>;
    fn retention(&self) -> Retention;
    fn stats(&self) -> Stats;
    /// Make everything appended so far part of the sealed store.
    fn flush(&self) -> Result<(), TsdbError>;
    fn close(&self);
}

impl TimeSeriesStore for Tsdb {
    fn append(
        &self,
        tenant: &str,
        device: &str,
        points: &[InPoint<'_>],
    ) -> Result<Appended, TsdbError> {
        Tsdb::append(self, tenant, device, points)
    }
    fn raw(&self, q: &RawQuery<'_>) -> Result<RawPage, TsdbError> {
        Tsdb::raw(self, q)
    }
    fn aggregate(&self, q: &AggQuery<'_>) -> Result<(Vec<SeriesBuckets>, AggSources), TsdbError> {
        Tsdb::aggregate(self, q)
    }
    fn latest(&self, tenant: &str, device: &str) -> Result<Vec<Latest>, TsdbError> {
        Tsdb::latest(self, tenant, device)
    }
    fn series(&self, tenant: &str, device: Option<&str>, metric: Option<&str>) -> Vec<SeriesInfo> {
        Tsdb::series(self, tenant, device, metric)
    }
    fn set_retention(&self, r: Retention) -> Result<(), TsdbError> {
        Tsdb::set_retention(self, r)
    }
    fn retention(&self) -> Retention {
        Tsdb::retention(self)
    }
    fn stats(&self) -> Stats {
        Tsdb::stats(self)
    }
    fn flush(&self) -> Result<(), TsdbError> {
        Tsdb::flush(self)
    }
    fn close(&self) {
        Tsdb::close(self)
    }
}
