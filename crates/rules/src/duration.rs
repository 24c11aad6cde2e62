//! Durations as rule authors write them: `500ms`, `10s`, `5m`, `1h`, `1d`
//! (also `5min`). One unit per literal keeps them unambiguous; the upper
//! bound keeps window and timer arithmetic far from i64 overflow.

/// The longest duration a rule may use (30 days).
pub(crate) const MAX_MS: i64 = 30 * 24 * 3_600_000;

/// Parse a duration into milliseconds.
pub(crate) fn parse(text: &str) -> Result<i64, &'static str> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or("missing unit (use ms, s, m, h or d, e.g. 30s)")?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err("missing number (e.g. 30s)");
    }
    let unit_ms = match unit.to_ascii_lowercase().as_str() {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err("unknown unit (use ms, s, m, h or d)"),
    };
    let value: f64 = number.parse().map_err(|_| "not a number")?;
    let ms = (value * unit_ms).round();
    if ms < 1.0 {
        return Err("must be at least 1ms");
    }
    if ms > MAX_MS as f64 {
        return Err("longer than 30 days");
    }
    Ok(ms as i64)
}

/// True for the units [`parse`] accepts: the lexer glues `30` `s` into one
/// duration token only for these.
pub(crate) fn is_unit(word: &str) -> bool {
    matches!(
        word.to_ascii_lowercase().as_str(),
        "ms" | "s" | "m" | "min" | "h" | "d"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("500ms"), Ok(500));
        assert_eq!(parse("10s"), Ok(10_000));
        assert_eq!(parse("1.5s"), Ok(1_500));
        assert_eq!(parse("5m"), Ok(300_000));
        assert_eq!(parse("5min"), Ok(300_000));
        assert_eq!(parse("2h"), Ok(7_200_000));
        assert_eq!(parse("1d"), Ok(86_400_000));
    }

    #[test]
    fn refusals() {
        assert!(parse("10").is_err());
        assert!(parse("s").is_err());
        assert!(parse("10y").is_err());
        assert!(parse("0s").is_err());
        assert!(parse("31d").is_err());
        assert!(parse("1.2.3s").is_err());
    }
}
