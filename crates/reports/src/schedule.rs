//! When a report runs and which period it covers, in a time zone's
//! wall-clock time.
//!
//! Schedules are stated the way people state them ("monthly on the 31st at
//! 06:00, Berlin time"), so every computation goes through the local
//! calendar: the next run is the first matching local date whose local
//! time of day, converted back to an instant, lies after the given instant.
//! A month shorter than the requested day runs on its last day; a time of
//! day that a DST change skips runs at the same distance after the gap
//! (jiff's "compatible" rule), one that occurs twice runs at the first.
//! The period a run reports on ends at the local midnight that starts its
//! run's day: yesterday for a daily report, the seven days before it for a
//! weekly one, the previous calendar month for a monthly one.

use crate::ReportError;
use jiff::civil::{Date, Time};
use jiff::tz::{Offset, TimeZone};
use jiff::{Span, Timestamp};
use m2mhub_fleet::{Frequency, Schedule};

/// A schedule checked and resolved: the zone loaded, the time parsed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub every: Frequency,
    pub at: Time,
    /// Weekly: 1 (Monday) to 7.
    pub weekday: i8,
    /// Monthly: 1 to 31.
    pub day: i8,
    pub zone: TimeZone,
}

/// `UTC`, a fixed offset (`+05:30`, `-03`, `UTC+01:00`) or an IANA name.
pub fn parse_zone(s: &str) -> Result<TimeZone, ReportError> {
    let bad = || {
        ReportError::Invalid(format!(
            "time_zone {s:?}: use an IANA name (Europe/Berlin), UTC or an offset like +05:30"
        ))
    };
    let t = s.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(TimeZone::UTC);
    }
    let offset = t
        .strip_prefix("UTC")
        .filter(|r| r.starts_with(['+', '-']))
        .unwrap_or(t);
    if let Some(rest) = offset.strip_prefix(['+', '-']) {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
        let h: i32 = h.parse().map_err(|_| bad())?;
        let m: i32 = m.parse().map_err(|_| bad())?;
        if !(0..=18).contains(&h) || !(0..60).contains(&m) {
            return Err(bad());
        }
        let off = Offset::from_seconds(sign * (h * 3600 + m * 60)).map_err(|_| bad())?;
        return Ok(TimeZone::fixed(off));
    }
    TimeZone::get(t).map_err(|_| bad())
}

impl Plan {
    /// Check a stored schedule; the error names the field and the fix.
    pub fn new(s: &Schedule) -> Result<Plan, ReportError> {
        let zone = parse_zone(&s.time_zone)?;
        let at = parse_time(&s.at)?;
        let weekday = match (s.every, s.weekday) {
            (Frequency::Weekly, Some(w @ 1..=7)) => w as i8,
            (Frequency::Weekly, _) => {
                return Err(ReportError::Invalid(
                    "a weekly schedule needs weekday 1 (Monday) to 7 (Sunday)".into(),
                ))
            }
            (_, Some(_)) => {
                return Err(ReportError::Invalid(
                    "weekday is only for weekly schedules".into(),
                ))
            }
            (_, None) => 1,
        };
        let day =
            match (s.every, s.day) {
                (Frequency::Monthly, Some(d @ 1..=31)) => d as i8,
                (Frequency::Monthly, _) => return Err(ReportError::Invalid(
                    "a monthly schedule needs day 1 to 31 (a shorter month runs on its last day)"
                        .into(),
                )),
                (_, Some(_)) => {
                    return Err(ReportError::Invalid(
                        "day is only for monthly schedules".into(),
                    ))
                }
                (_, None) => 1,
            };
        Ok(Plan {
            every: s.every,
            at,
            weekday,
            day,
            zone,
        })
    }

    /// Whether the schedule runs on local date `d`.
    fn runs_on(&self, d: Date) -> bool {
        match self.every {
            Frequency::Daily => true,
            Frequency::Weekly => d.weekday().to_monday_one_offset() == self.weekday,
            Frequency::Monthly => d.day() == self.day.min(d.days_in_month()),
        }
    }

    /// The run instant on local date `d`.
    fn instant_on(&self, d: Date) -> Result<i64, ReportError> {
        let z = d.to_datetime(self.at).to_zoned(self.zone.clone())?;
        Ok(z.timestamp().as_millisecond())
    }

    /// The first run strictly after `after_ms`.
    pub fn next_after(&self, after_ms: i64) -> Result<i64, ReportError> {
        let t = Timestamp::from_millisecond(after_ms)?;
        // From the day before: a run on the previous local date may still
        // lie after `t` when a DST change moved it.
        let mut d = t.to_zoned(self.zone.clone()).date().yesterday()?;
        // A month has at most 31 days; two months cover any monthly gap.
        for _ in 0..64 {
            if self.runs_on(d) {
                let at = self.instant_on(d)?;
                if at > after_ms {
                    return Ok(at);
                }
            }
            d = d.tomorrow()?;
        }
        Err(ReportError::Invalid("no run within two months".into()))
    }

    /// The period `[from, to)` a run at `run_ms` reports on.
    pub fn period_of(&self, run_ms: i64) -> Result<(i64, i64), ReportError> {
        let day = Timestamp::from_millisecond(run_ms)?
            .to_zoned(self.zone.clone())
            .date();
        let (from, to) = match self.every {
            Frequency::Daily => (day.yesterday()?, day),
            Frequency::Weekly => (day.checked_sub(Span::new().days(7))?, day),
            Frequency::Monthly => {
                let first = day.first_of_month();
                (first.checked_sub(Span::new().months(1))?, first)
            }
        };
        Ok((self.midnight(from)?, self.midnight(to)?))
    }

    /// The instant local date `d` starts.
    pub fn midnight(&self, d: Date) -> Result<i64, ReportError> {
        Ok(d.to_zoned(self.zone.clone())?.timestamp().as_millisecond())
    }
}

/// `HH:MM`, 00:00 to 23:59.
fn parse_time(s: &str) -> Result<Time, ReportError> {
    let bad = || ReportError::Invalid(format!("at {s:?}: use HH:MM, 00:00 to 23:59"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: i8 = h.parse().map_err(|_| bad())?;
    let m: i8 = m.parse().map_err(|_| bad())?;
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

/// The local date of instant `ms` in `zone`.
pub fn local_date(zone: &TimeZone, ms: i64) -> Result<Date, ReportError> {
    Ok(Timestamp::from_millisecond(ms)?
        .to_zoned(zone.clone())
        .date())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plan(every: Frequency, at: &str, wd: Option<u8>, day: Option<u8>, tz: &str) -> Plan {
        Plan::new(&Schedule {
            every,
            at: at.into(),
            weekday: wd,
            day,
            time_zone: tz.into(),
        })
        .expect("valid schedule")
    }

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().expect("timestamp").as_millisecond()
    }

    #[test]
    fn monthly_on_the_31st_runs_on_the_last_day_of_short_months() {
        let p = plan(Frequency::Monthly, "06:00", None, Some(31), "Europe/Berlin");
        // 2026-01-31 06:00 CET is 05:00Z.
        let jan = p.next_after(ms("2026-01-15T00:00:00Z")).expect("next");
        assert_eq!(jan, ms("2026-01-31T05:00:00Z"));
        assert_eq!(p.next_after(jan).expect("next"), ms("2026-02-28T05:00:00Z"));
        // A leap year's February; March's 31st is in summer time (CEST).
        assert_eq!(
            p.next_after(ms("2028-02-01T00:00:00Z")).expect("next"),
            ms("2028-02-29T05:00:00Z")
        );
        assert_eq!(
            p.next_after(ms("2026-03-01T00:00:00Z")).expect("next"),
            ms("2026-03-31T04:00:00Z")
        );
        // A March run reports on February, from local midnight to local
        // midnight.
        let (from, to) = p.period_of(ms("2026-03-31T04:00:00Z")).expect("period");
        assert_eq!(
            (from, to),
            (ms("2026-01-31T23:00:00Z"), ms("2026-02-28T23:00:00Z"))
        );
    }

    #[test]
    fn periods_end_at_local_midnight() {
        let p = plan(Frequency::Daily, "01:00", None, None, "+05:30");
        let run = p.next_after(ms("2026-06-10T00:00:00Z")).expect("next");
        // 2026-06-11 01:00 +05:30 = 2026-06-10T19:30Z.
        assert_eq!(run, ms("2026-06-10T19:30:00Z"));
        assert_eq!(
            p.period_of(run).expect("period"),
            (ms("2026-06-09T18:30:00Z"), ms("2026-06-10T18:30:00Z"))
        );
        let w = plan(Frequency::Weekly, "08:00", Some(1), None, "UTC");
        let run = w.next_after(ms("2026-06-10T00:00:00Z")).expect("next");
        assert_eq!(run, ms("2026-06-15T08:00:00Z")); // a Monday
        assert_eq!(
            w.period_of(run).expect("period"),
            (ms("2026-06-08T00:00:00Z"), ms("2026-06-15T00:00:00Z"))
        );
    }

    #[test]
    fn a_time_skipped_by_dst_runs_after_the_gap() {
        // New York springs forward at 02:00 on 2026-03-08: 02:30 does not
        // exist that day, the run is at 03:30 EDT (07:30Z).
        let p = plan(Frequency::Daily, "02:30", None, None, "America/New_York");
        assert_eq!(
            p.next_after(ms("2026-03-08T00:00:00Z")).expect("next"),
            ms("2026-03-08T07:30:00Z")
        );
        assert_eq!(
            p.next_after(ms("2026-03-08T07:30:00Z")).expect("next"),
            ms("2026-03-09T06:30:00Z")
        );
    }

    #[test]
    fn bad_schedules_are_refused() {
        for (every, at, wd, day, tz) in [
            (Frequency::Daily, "24:00", None, None, "UTC"),
            (Frequency::Daily, "6:00", None, None, "UTC"),
            (Frequency::Daily, "06:00", None, None, "Mars/Olympus"),
            (Frequency::Daily, "06:00", None, None, "+25:00"),
            (Frequency::Weekly, "06:00", None, None, "UTC"),
            (Frequency::Weekly, "06:00", Some(8), None, "UTC"),
            (Frequency::Monthly, "06:00", None, Some(0), "UTC"),
            (Frequency::Daily, "06:00", Some(1), None, "UTC"),
        ] {
            let s = Schedule {
                every,
                at: at.into(),
                weekday: wd,
                day,
                time_zone: tz.into(),
            };
            assert!(Plan::new(&s).is_err(), "{s:?} accepted");
        }
    }

    const ZONES: [&str; 9] = [
        "UTC",
        "+05:45",
        "-03:30",
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "Pacific/Chatham",
        "America/Santiago",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// The next run lies after the instant, on a date the schedule
        /// names (a short month's last day for a late monthly day), at the
        /// requested local time converted the documented way, and no
        /// scheduled instant lies between the two.
        #[test]
        fn next_run_is_the_first_scheduled_instant_after(
            t in ms("2000-01-01T00:00:00Z")..ms("2060-01-01T00:00:00Z"),
            zone in 0..ZONES.len(),
            every in 0..3u8,
            h in 0..24i8,
            m in 0..60i8,
            wd in 1..=7u8,
            day in 1..=31u8,
        ) {
            let every = [Frequency::Daily, Frequency::Weekly, Frequency::Monthly][every as usize];
            let p = plan(
                every,
                &format!("{h:02}:{m:02}"),
                (every == Frequency::Weekly).then_some(wd),
                (every == Frequency::Monthly).then_some(day),
                ZONES[zone],
            );
            let next = p.next_after(t).expect("next");
            prop_assert!(next > t);
            prop_assert!(next - t <= 32 * 86_400_000, "too far: {}", next - t);
            let z = Timestamp::from_millisecond(next).expect("ts").to_zoned(p.zone.clone());
            let d = z.date();
            match every {
                Frequency::Daily => {}
                Frequency::Weekly => prop_assert_eq!(d.weekday().to_monday_one_offset(), wd as i8),
                Frequency::Monthly => {
                    let last = d.last_of_month().day();
                    prop_assert_eq!(d.day(), (day as i8).min(last));
                }
            }
            // The local time is the requested one, unless a gap moved it.
            let want = d.at(h, m, 0, 0).to_zoned(p.zone.clone()).expect("zoned");
            prop_assert_eq!(want.timestamp().as_millisecond(), next);
            // Minimal: every earlier scheduled instant is at or before `t`.
            let mut e = Timestamp::from_millisecond(t).expect("ts").to_zoned(p.zone.clone()).date()
                .checked_sub(Span::new().days(2)).expect("date");
            while e < d {
                let runs = match every {
                    Frequency::Daily => true,
                    Frequency::Weekly => e.weekday().to_monday_one_offset() == wd as i8,
                    Frequency::Monthly => e.day() == (day as i8).min(e.last_of_month().day()),
                };
                if runs {
                    let at = e.at(h, m, 0, 0).to_zoned(p.zone.clone()).expect("zoned");
                    prop_assert!(at.timestamp().as_millisecond() <= t, "missed {e}");
                }
                e = e.tomorrow().expect("date");
            }
            // The period ends at the local midnight starting the run's day
            // (monthly: its month) and spans one day, a week or a month.
            let (from, to) = p.period_of(next).expect("period");
            prop_assert!(from < to && to <= next);
            let (start, end) = (local_date(&p.zone, from).expect("date"), local_date(&p.zone, to).expect("date"));
            let span = match every {
                Frequency::Daily => Span::new().days(1),
                Frequency::Weekly => Span::new().days(7),
                Frequency::Monthly => Span::new().months(1),
            };
            let want_end = if every == Frequency::Monthly { d.first_of_month() } else { d };
            prop_assert_eq!(end, want_end);
            prop_assert_eq!(start.checked_add(span).expect("date"), end);
        }
    }
}
