//! The series this node knows: `(tenant, device, metric)` → the database's
//! id and the series' kind.
//!
//! An append checks kinds here without a round trip. A series the node has
//! not seen is admitted with the kind of its first value and no id yet;
//! the writer inserts it (or finds another node's row) before the points'
//! `COPY` and records the id, and when another node had created it with
//! another kind first, the database's kind wins and the writer drops the
//! points that do not fit (counted as rejected).

use super::Shared;
use crate::error::PgResult;
use m2mhub_tsdb::{InPoint, Kind, Value, MAX_NAME};
use postgres::Client;
use std::collections::HashMap;
use std::sync::Arc;

/// What the node knows of one series.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Known {
    /// `None` until the writer has the series' row.
    pub id: Option<i32>,
    pub kind: Kind,
}

type Metrics = HashMap<Arc<str>, Known>;

#[derive(Default)]
pub(crate) struct Catalog {
    tenants: HashMap<Arc<str>, HashMap<Arc<str>, Metrics>>,
    len: usize,
}

/// The accepted points of one append, ready for the writer.
pub(crate) struct Batch {
    pub tenant: Arc<str>,
    pub device: Arc<str>,
    pub points: Vec<BatchPoint>,
}

pub(crate) struct BatchPoint {
    pub metric: Arc<str>,
    /// The series' id when the node had it at append time (its kind was
    /// checked then, and never changes); `None` for the writer to resolve.
    pub id: Option<i32>,
    pub ts: i64,
    pub value: Value,
}

impl Catalog {
    /// Every series in the database (the node's cache at open).
    pub fn load(c: &mut Client) -> PgResult<Catalog> {
        let mut cat = Catalog::default();
        for row in c.query("SELECT id, tenant, device, metric, kind FROM series", &[])? {
            let kind: i16 = row.try_get(4)?;
            let Some(kind) = u8::try_from(kind).ok().and_then(Kind::from_code) else {
                tracing::warn!(kind, "a telemetry series of an unknown kind is skipped");
                continue;
            };
            cat.set(
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                Known {
                    id: Some(row.try_get(0)?),
                    kind,
                },
            );
        }
        Ok(cat)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn device(&self, tenant: &str, device: &str) -> Option<&Metrics> {
        self.tenants.get(tenant)?.get(device)
    }

    pub fn get(&self, tenant: &str, device: &str, metric: &str) -> Option<Known> {
        self.device(tenant, device)?.get(metric).copied()
    }

    /// Record (or correct) what is known of a series.
    pub fn set(&mut self, tenant: &str, device: &str, metric: &str, known: Known) {
        let devices = match self.tenants.get_mut(tenant) {
            Some(d) => d,
            None => self.tenants.entry(tenant.into()).or_default(),
        };
        let metrics = match devices.get_mut(device) {
            Some(m) => m,
            None => devices.entry(device.into()).or_default(),
        };
        match metrics.get_mut(metric) {
            Some(k) => *k = known,
            None => {
                metrics.insert(metric.into(), known);
                self.len += 1;
            }
        }
    }

    /// The shared names of a device (so a batch does not allocate them).
    fn names(&self, tenant: &str, device: &str) -> Option<(Arc<str>, Arc<str>)> {
        let (t, devices) = self.tenants.get_key_value(tenant)?;
        let (d, _) = devices.get_key_value(device)?;
        Some((t.clone(), d.clone()))
    }

    fn metric_name(&self, tenant: &str, device: &str, metric: &str) -> Option<Arc<str>> {
        let (m, _) = self.device(tenant, device)?.get_key_value(metric)?;
        Some(m.clone())
    }
}

impl Shared {
    /// Check the points of one append against the series' kinds (admitting
    /// new series), as the embedded store's append does: the batch for the
    /// writer and the refused points with their reasons.
    pub(crate) fn catalog_admit(
        &self,
        tenant: &str,
        device: &str,
        points: &[InPoint<'_>],
    ) -> (Batch, Vec<(String, String)>) {
        {
            let cat = self.catalog.read();
            let all_known = points
                .iter()
                .all(|p| cat.get(tenant, device, p.metric).is_some());
            if all_known {
                if let Some((t, d)) = cat.names(tenant, device) {
                    return admit(&cat, t, d, points);
                }
            }
        }
        let mut cat = self.catalog.write();
        for p in points {
            let bad_name = p.metric.is_empty() || p.metric.len() > MAX_NAME;
            if !bad_name && cat.get(tenant, device, p.metric).is_none() {
                cat.set(
                    tenant,
                    device,
                    p.metric,
                    Known {
                        id: None,
                        kind: p.value.kind(),
                    },
                );
            }
        }
        let (t, d) = cat
            .names(tenant, device)
            .unwrap_or_else(|| (tenant.into(), device.into()));
        admit(&cat, t, d, points)
    }
}

fn admit(
    cat: &Catalog,
    tenant: Arc<str>,
    device: Arc<str>,
    points: &[InPoint<'_>],
) -> (Batch, Vec<(String, String)>) {
    let mut out = Vec::with_capacity(points.len());
    let mut rejected = Vec::new();
    for p in points {
        let Some(known) = cat.get(&tenant, &device, p.metric) else {
            rejected.push((
                p.metric.to_string(),
                format!("metric names must be 1 to {MAX_NAME} bytes"),
            ));
            continue;
        };
        if !known.kind.accepts(&p.value) {
            rejected.push((p.metric.to_string(), known.kind.refusal(p.metric, &p.value)));
            continue;
        }
        let name = cat
            .metric_name(&tenant, &device, p.metric)
            .unwrap_or_else(|| p.metric.into());
        out.push(BatchPoint {
            metric: name,
            id: known.id,
            ts: p.ts_ms,
            value: p.value.clone(),
        });
    }
    (
        Batch {
            tenant,
            device,
            points: out,
        },
        rejected,
    )
}
