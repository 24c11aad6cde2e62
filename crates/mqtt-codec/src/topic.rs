//! Topic names, topic filters and shared subscriptions (MQTT 5 section 4.7,
//! 4.8.2), checked once at the edge so the router can split on `/` blindly.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than 65,535 bytes")]
    TooLong,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name contains a wildcard")]
    WildcardInName,
    #[error("'#' must be the last level of a filter and stand alone in it")]
    MisplacedMultiLevel,
    #[error("'+' must stand alone in a level")]
    MisplacedSingleLevel,
    #[error("shared subscription must be $share/{{group}}/{{filter}} with a non-empty group without wildcards")]
    BadShare,
}

/// Check a topic name as it appears in PUBLISH or a will.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    for b in topic.bytes() {
        match b {
            b'+' | b'#' => return Err(TopicError::WildcardInName),
            0 => return Err(TopicError::Nul),
            _ => {}
        }
    }
    Ok(())
}

/// Check a topic filter as it appears in SUBSCRIBE or UNSUBSCRIBE,
/// including `$share/{group}/{filter}`.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    let inner = match parse_shared(filter) {
        Some(Ok((_, inner))) => inner,
        Some(Err(e)) => return Err(e),
        None => filter,
    };
    let mut levels = inner.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('\0') {
            return Err(TopicError::Nul);
        }
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevel);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevel);
        }
    }
    Ok(())
}

/// Split `$share/{group}/{filter}` into `(group, filter)`.
///
/// Returns `None` for a filter that is not shared, `Some(Err)` for a shared
/// filter that is malformed.
pub fn parse_shared(filter: &str) -> Option<Result<(&str, &str), TopicError>> {
    let rest = filter.strip_prefix("$share/")?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(TopicError::BadShare));
    };
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return Some(Err(TopicError::BadShare));
    }
    Some(Ok((group, inner)))
}

/// Whether a (valid, non-shared) filter matches a (valid) topic name.
///
/// Topics starting with `$` are not matched by filters starting with a
/// wildcard (section 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a filter contains a wildcard.
pub fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_topic_name("a/b").is_ok());
        assert!(validate_topic_name("/").is_ok());
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::Nul));
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+/c",
            "/",
            "a//b",
            "$share/g/a/#",
            "$SYS/#",
        ] {
            assert!(validate_topic_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(validate_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+", ""));
        assert!(matches("+/+", "/"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/b", "a/b/c"));
    }
}
