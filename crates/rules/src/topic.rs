//! The FROM clause: an MQTT topic filter, split into levels once at
//! creation and matched against each topic without allocating. Also the
//! topic's device id (`devices/{id}/…`) and its segments, which rules read.

/// A compiled MQTT topic filter (`devices/+/telemetry`, `$events/#`).
#[derive(Debug, Clone, PartialEq)]
pub struct TopicFilter {
    text: String,
    levels: Box<[Level]>,
}

#[derive(Debug, Clone, PartialEq)]
enum Level {
    Exact(Box<str>),
    /// `+`: exactly one level.
    Single,
    /// `#`: this level and all below (also none: `a/#` matches `a`).
    Multi,
}

impl TopicFilter {
    /// Parse and validate a filter by the MQTT rules (`+` and `#` alone in
    /// their level, `#` last).
    pub fn parse(text: &str) -> Result<TopicFilter, &'static str> {
        if text.is_empty() {
            return Err("empty");
        }
        if text.contains('\0') {
            return Err("contains a NUL character");
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "+" => Level::Single,
                "#" if i + 1 == parts.len() => Level::Multi,
                "#" => return Err("`#` must be the last level"),
                p if p.contains(['+', '#']) => {
                    return Err("`+` and `#` must stand alone in their level")
                }
                p => Level::Exact(p.into()),
            });
        }
        Ok(TopicFilter {
            text: text.to_string(),
            levels: levels.into(),
        })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the filter is an event source (`$events/…`).
    pub fn is_event_source(&self) -> bool {
        self.text.starts_with("$events/")
    }

    /// MQTT matching: a wildcard in the first level does not match topics
    /// starting with `$` (so `#` does not see `$events/…` or `$SYS/…`).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Exact(_))) {
            return false;
        }
        // Byte splitting: `/` is ASCII, so it never cuts a UTF-8 sequence.
        let mut parts = topic.as_bytes().split(|b| *b == b'/');
        for level in self.levels.iter() {
            match level {
                Level::Multi => return true,
                Level::Single => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Exact(want) => match parts.next() {
                    Some(p) if p == want.as_bytes() => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// The device a message is about: `{id}` of `devices/{id}/…`, else the
/// payload's top-level string member `device` (how event sources such as
/// `$events/device_connected` name the device).
pub(crate) fn device_of<'a>(topic: &'a str, payload: &'a serde_json::Value) -> Option<&'a str> {
    if let Some(rest) = topic.strip_prefix("devices/") {
        let id = rest.find('/').map_or(rest, |i| &rest[..i]);
        if !id.is_empty() {
            return Some(id);
        }
    }
    payload.get("device").and_then(|d| d.as_str())
}

/// The 0-based `index`th level of a topic.
pub(crate) fn segment(topic: &str, index: usize) -> Option<&str> {
    topic.split('/').nth(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::parse(filter).expect("filter").matches(topic)
    }

    #[test]
    fn matching() {
        assert!(m("devices/+/telemetry", "devices/m1/telemetry"));
        assert!(!m("devices/+/telemetry", "devices/m1/telemetry/x"));
        assert!(!m("devices/+/telemetry", "devices/m1"));
        assert!(m("devices/#", "devices"));
        assert!(m("devices/#", "devices/a/b/c"));
        assert!(m("#", "a/b"));
        assert!(!m("#", "$events/device_connected"));
        assert!(!m("+/device_connected", "$events/device_connected"));
        assert!(m("$events/device_connected", "$events/device_connected"));
        assert!(m("a//b", "a//b"));
        assert!(m("+/+", "/x"));
    }

    #[test]
    fn validation() {
        assert!(TopicFilter::parse("").is_err());
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("a#").is_err());
    }

    #[test]
    fn device() {
        let p = serde_json::json!({"device": "d9"});
        assert_eq!(device_of("devices/m1/telemetry", &p), Some("m1"));
        assert_eq!(device_of("$events/device_connected", &p), Some("d9"));
        assert_eq!(device_of("other", &serde_json::json!({})), None);
        assert_eq!(segment("devices/m1/telemetry", 1), Some("m1"));
        assert_eq!(segment("devices/m1/telemetry", 3), None);
    }
}
