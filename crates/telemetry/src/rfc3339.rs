//! RFC 3339 timestamps: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` to epoch ms.
//!
//! `t`/`z` and a space separator are accepted (RFC 3339 §5.6 note); the
//! fraction is truncated to milliseconds; a leap second (`:60`) is folded
//! into the following second.

/// Parse `s` into milliseconds since the Unix epoch.
pub(crate) fn parse(s: &str) -> Result<i64, String> {
    let b = s.as_bytes();
    let bad = || format!("{s:?} is not an RFC 3339 timestamp");
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let digits = b.get(from..from + len).ok_or_else(bad)?;
        digits.iter().try_fold(0i64, |acc, &d| {
            if d.is_ascii_digit() {
                Ok(acc * 10 + i64::from(d - b'0'))
            } else {
                Err(bad())
            }
        })
    };
    let sep = |i: usize, c: &[u8]| {
        if c.contains(&b[i]) {
            Ok(())
        } else {
            Err(bad())
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt ")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return Err(bad());
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return Err(format!("{s:?} has an out-of-range UTC offset"));
            }
            let off = oh * 60 + om;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(format!("{s:?} has an out-of-range date or time field"));
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Ok(secs * 1000 + millis)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn valid() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse("2013-03-21T20:04:00Z"), Ok(1_363_896_240_000));
        assert_eq!(parse("2013-03-21t20:04:00.5z"), Ok(1_363_896_240_500));
        assert_eq!(parse("2013-03-21 20:04:00.123456Z"), Ok(1_363_896_240_123));
        assert_eq!(parse("2013-03-21T22:04:00+02:00"), Ok(1_363_896_240_000));
        assert_eq!(parse("2013-03-21T15:34:00.25-04:30"), Ok(1_363_896_240_250));
        assert_eq!(parse("1969-12-31T23:59:59Z"), Ok(-1000));
        assert_eq!(parse("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
        assert_eq!(parse("2016-12-31T23:59:60Z"), Ok(1_483_228_800_000));
    }

    #[test]
    fn invalid() {
        for s in [
            "",
            "2013-03-21",
            "2013-03-21T20:04:00",
            "2013-03-21T20:04:00+0200",
            "2013-13-01T00:00:00Z",
            "2013-02-29T00:00:00Z",
            "2013-03-21T24:00:00Z",
            "2013-03-21T20:60:00Z",
            "2013-03-21T20:04:00.Z",
            "2013-03-21T20:04:00Zjunk",
            "2013-03-21T20:04:00+24:00",
            "2013/03/21T20:04:00Z",
            "२०१३-03-21T20:04:00Z",
        ] {
            assert!(parse(s).is_err(), "{s:?} accepted");
        }
    }
}
