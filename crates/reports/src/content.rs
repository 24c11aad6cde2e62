//! What each kind of report computes from stored data, as a table with its
//! charts and summary. Blocking (store reads): the service calls these on
//! the blocking pool.

use crate::schedule::local_date;
use crate::ReportError;
use jiff::tz::TimeZone;
use m2mhub_fleet::{Alarm, AlarmFilter, EnergyMode, Fleet, Severity};
use m2mhub_identity::DeviceFilter;
use m2mhub_tsdb::{AggQuery, TimeSeriesStore};
use std::collections::BTreeMap;

/// One cell of a report table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    /// A number shown with this many decimals.
    Num(f64, usize),
}

/// A horizontal bar chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub unit: String,
    pub bars: Vec<(String, f64)>,
}

/// A computed report, ready to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub title: String,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
    pub charts: Vec<Chart>,
    /// Headline figures shown above the charts.
    pub summary: Vec<(String, String)>,
}

/// Buckets energy readings are read in: a divisor of every UTC offset in
/// use (15 min, e.g. +05:45), so every bucket lies within one local day,
/// and a whole number of minutes, so the store answers from its 1 min
/// rollups.
const BUCKET_MS: i64 = 15 * 60_000;

/// Energy per device and local day. `counter`: the increase of a
/// cumulative meter reading between consecutive readings within the period
/// (a reading below its predecessor is a reset and counts from zero), each
/// increase booked on the day of the later reading; `sum`: the sum of the
/// readings.
#[allow(clippy::too_many_arguments)]
pub fn energy(
    tsdb: &dyn TimeSeriesStore,
    tenant: &str,
    devices: &[String],
    metric: &str,
    mode: EnergyMode,
    zone: &TimeZone,
    from_ms: i64,
    to_ms: i64,
) -> Result<Content, ReportError> {
    let (series, _) = tsdb.aggregate(&AggQuery {
        tenant,
        metric,
        devices,
        from_ms,
        to_ms,
        bucket_ms: BUCKET_MS,
    })?;
    let increase = |a: f64, b: f64| if b >= a { b - a } else { b };
    let mut per_day: BTreeMap<(String, jiff::civil::Date), (f64, u64)> = BTreeMap::new();
    for s in &series {
        let mut prev_last: Option<f64> = None;
        for (_, agg) in &s.buckets {
            let mut v = match mode {
                EnergyMode::Counter => increase(agg.first, agg.last),
                EnergyMode::Sum => agg.sum,
            };
            if let (EnergyMode::Counter, Some(p)) = (mode, prev_last) {
                v += increase(p, agg.first);
            }
            prev_last = Some(agg.last);
            let day = local_date(zone, agg.first_ts)?;
            let e = per_day.entry((s.device.to_string(), day)).or_default();
            e.0 += v;
            e.1 += agg.count;
        }
    }
    let mut by_device: BTreeMap<String, f64> = BTreeMap::new();
    let mut by_day: BTreeMap<jiff::civil::Date, f64> = BTreeMap::new();
    let mut rows = Vec::with_capacity(per_day.len());
    let mut total = 0.0;
    for ((device, day), (v, n)) in per_day {
        *by_device.entry(device.clone()).or_default() += v;
        *by_day.entry(day).or_default() += v;
        total += v;
        rows.push(vec![
            Cell::Text(device),
            Cell::Text(day.to_string()),
            Cell::Num(v, 3),
            Cell::Int(i64::try_from(n).unwrap_or(i64::MAX)),
        ]);
    }
    Ok(Content {
        title: format!("Energy ({metric})"),
        columns: vec!["device", "date", "energy", "readings"],
        summary: vec![
            ("Meters".into(), by_device.len().to_string()),
            ("Total".into(), format!("{total:.3} {metric}")),
            (
                "Method".into(),
                match mode {
                    EnergyMode::Counter => "increase of a cumulative counter".into(),
                    EnergyMode::Sum => "sum of readings".into(),
                },
            ),
        ],
        charts: vec![
            Chart {
                title: "Energy per day".into(),
                unit: metric.into(),
                bars: by_day
                    .into_iter()
                    .map(|(d, v)| (d.to_string(), v))
                    .collect(),
            },
            Chart {
                title: "Energy per meter".into(),
                unit: metric.into(),
                bars: by_device.into_iter().collect(),
            },
        ],
        rows,
    })
}

/// The devices a report covers: the named ones of the tenant, or all.
pub fn tenant_devices(
    fleet: &Fleet,
    tenant: &str,
    named: &[String],
) -> Result<Vec<String>, ReportError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = fleet.identity().list_devices(&DeviceFilter {
            tenant: Some(tenant.into()),
            after: after.clone(),
            limit: Some(10_000),
            ..Default::default()
        })?;
        let last = page.last().map(|d| d.id.clone());
        out.extend(
            page.into_iter()
                .map(|d| d.id)
                .filter(|id| named.is_empty() || named.contains(id)),
        );
        match last {
            Some(l) => after = Some(l),
            None => return Ok(out),
        }
    }
}

/// How many connection events of one device are read at most (the store
/// keeps 1,000 events per device anyway).
const MAX_EVENTS: usize = 5_000;

/// Each device's share of the period connected, from its connection
/// history: the state at the period's start is that of its last event
/// before it (none: offline), and every `connected`/`disconnected` event in
/// the period switches it. The history is rate-limited and capped per
/// device, so a flapping device's figure is approximate.
pub fn availability(
    fleet: &Fleet,
    tenant: &str,
    devices: &[String],
    from_ms: i64,
    to_ms: i64,
) -> Result<Content, ReportError> {
    let period = (to_ms - from_ms).max(1);
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    let mut sum_pct = 0.0;
    for device in tenant_devices(fleet, tenant, devices)? {
        let mut events = Vec::new();
        let mut before = None;
        'pages: loop {
            let page = fleet.list_device_events(
                Some(tenant),
                &device,
                Some("connection"),
                before,
                1_000,
            )?;
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            for e in page {
                let older = e.ts_ms < from_ms;
                events.push(e);
                if older || events.len() >= MAX_EVENTS {
                    break 'pages;
                }
            }
        }
        events.reverse();
        let mut online = false;
        let mut since = from_ms;
        let (mut up_ms, mut connects, mut disconnects) = (0i64, 0i64, 0i64);
        for e in events.iter().filter(|e| e.ts_ms < to_ms) {
            // Anything else (a rate limit's summary) changes nothing.
            let now_online = if e.detail.starts_with("connected") {
                true
            } else if e.detail.starts_with("disconnected") {
                false
            } else {
                continue;
            };
            if e.ts_ms < from_ms {
                online = now_online;
                continue;
            }
            if online {
                up_ms += e.ts_ms - since;
            }
            if now_online {
                connects += 1;
            } else {
                disconnects += 1;
            }
            online = now_online;
            since = e.ts_ms;
        }
        if online {
            up_ms += to_ms - since;
        }
        let pct = 100.0 * up_ms as f64 / period as f64;
        sum_pct += pct;
        bars.push((device.clone(), pct));
        rows.push(vec![
            Cell::Text(device),
            Cell::Num(pct, 2),
            Cell::Int(up_ms / 1000),
            Cell::Int(connects),
            Cell::Int(disconnects),
        ]);
    }
    let n = rows.len();
    Ok(Content {
        title: "Fleet availability".into(),
        columns: vec![
            "device",
            "availability_pct",
            "connected_s",
            "connects",
            "disconnects",
        ],
        summary: vec![
            ("Devices".into(), n.to_string()),
            (
                "Mean availability".into(),
                if n == 0 {
                    "-".into()
                } else {
                    format!("{:.2} %", sum_pct / n as f64)
                },
            ),
        ],
        charts: vec![Chart {
            title: "Availability per device".into(),
            unit: "%".into(),
            bars,
        }],
        rows,
    })
}

/// How far before the period alarms are looked for (one still open, or
/// cleared within the period, counts as open in it).
const ALARM_LOOKBACK_MS: i64 = 90 * 86_400_000;
/// Alarms read at most per report.
const MAX_ALARMS: usize = 100_000;

/// Alarms open at some time in the period, by severity and type: how many
/// were raised and cleared in it, how many were still open at its end, and
/// the longest time one was open (up to the period's end).
pub fn alarms(
    fleet: &Fleet,
    tenant: &str,
    devices: &[String],
    from_ms: i64,
    to_ms: i64,
) -> Result<Content, ReportError> {
    let mut seen: Vec<Alarm> = Vec::new();
    let mut before = None;
    let mut read = 0;
    'pages: loop {
        let page = fleet.list_alarms(&AlarmFilter {
            tenant: Some(tenant.into()),
            before,
            limit: Some(1_000),
            ..Default::default()
        })?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        for a in page {
            read += 1;
            if a.created_ms < from_ms - ALARM_LOOKBACK_MS || read > MAX_ALARMS {
                break 'pages;
            }
            let open_in_period = a.created_ms < to_ms && a.cleared_ms.is_none_or(|c| c >= from_ms);
            if open_in_period && (devices.is_empty() || devices.contains(&a.device_id)) {
                seen.push(a);
            }
        }
    }
    #[derive(Default)]
    struct Group {
        raised: i64,
        cleared: i64,
        open_at_end: i64,
        longest_ms: i64,
        longest: String,
    }
    let rank = |s: Severity| Severity::ALL.iter().position(|x| *x == s).unwrap_or(0);
    let mut groups: BTreeMap<(usize, String), Group> = BTreeMap::new();
    let mut longest: Vec<(String, f64)> = Vec::new();
    for a in &seen {
        let g = groups
            .entry((rank(a.severity), a.alarm_type.clone()))
            .or_default();
        if a.created_ms >= from_ms {
            g.raised += 1;
        }
        let cleared_in = a.cleared_ms.filter(|c| *c < to_ms);
        if cleared_in.is_some() {
            g.cleared += 1;
        } else {
            g.open_at_end += 1;
        }
        let open_ms = cleared_in.unwrap_or(to_ms) - a.created_ms;
        if open_ms > g.longest_ms {
            g.longest_ms = open_ms;
            g.longest = a.device_id.clone();
        }
        longest.push((
            format!("{} {} #{}", a.device_id, a.alarm_type, a.id),
            open_ms as f64 / 3_600_000.0,
        ));
    }
    longest.sort_by(|a, b| b.1.total_cmp(&a.1));
    longest.truncate(10);
    let mut by_severity: BTreeMap<usize, i64> = BTreeMap::new();
    let mut rows = Vec::new();
    for ((sev, ty), g) in groups {
        *by_severity.entry(sev).or_default() += g.raised;
        rows.push(vec![
            Cell::Text(Severity::ALL[sev].as_str().into()),
            Cell::Text(ty),
            Cell::Int(g.raised),
            Cell::Int(g.cleared),
            Cell::Int(g.open_at_end),
            Cell::Int(g.longest_ms / 1000),
            Cell::Text(g.longest),
        ]);
    }
    let raised: i64 = by_severity.values().sum();
    Ok(Content {
        title: "Alarm summary".into(),
        columns: vec![
            "severity",
            "type",
            "raised",
            "cleared",
            "open_at_end",
            "longest_open_s",
            "longest_open_device",
        ],
        summary: vec![
            ("Alarms raised".into(), raised.to_string()),
            ("Alarms open in the period".into(), seen.len().to_string()),
        ],
        charts: vec![
            Chart {
                title: "Alarms raised by severity".into(),
                unit: "alarms".into(),
                bars: by_severity
                    .into_iter()
                    .map(|(s, n)| (Severity::ALL[s].as_str().into(), n as f64))
                    .collect(),
            },
            Chart {
                title: "Longest open alarms".into(),
                unit: "h".into(),
                bars: longest,
            },
        ],
        rows,
    })
}
