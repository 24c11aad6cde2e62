//! MQTT topics as NATS subjects and JetStream key-value keys.
//!
//! NATS splits subjects at `.` and reserves `*`, `>` and whitespace; MQTT
//! levels may hold any of them, and may be empty. Each level is encoded on
//! its own, injectively: ASCII letters, digits and `-` stay; `_` becomes
//! `__`; every other byte becomes `_` and two hex digits; an empty level is
//! a lone `_` (no other level encodes to that). A filter's `+` becomes `*`
//! and `#` becomes `>`; since MQTT's `a/#` also matches `a` itself, such a
//! filter needs the subject `a` too.
//!
//! The receiving node matches every message against its own subscription
//! index anyway: the subject only decides which nodes receive it.

use std::fmt::Write as _;

/// Encode one topic level.
fn encode_level(level: &str, out: &mut String) {
    if level.is_empty() {
        out.push('_');
        return;
    }
    for b in level.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => out.push(char::from(b)),
            b'_' => out.push_str("__"),
            _ => {
                let _ = write!(out, "_{b:02x}");
            }
        }
    }
}

/// A topic name as dot-separated encoded levels (a NATS subject tail and a
/// valid key-value key).
pub fn encode_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        encode_level(level, &mut out);
    }
    out
}

/// The subject a message on `topic` is published to in a subject space
/// (`{cluster}.t` for QoS 0, `{cluster}.d` for QoS 1/2, which JetStream
/// keeps): `{space}.{levels}`.
pub fn topic_subject(space: &str, topic: &str) -> String {
    let mut s = String::with_capacity(space.len() + topic.len() + 12);
    s.push_str(space);
    s.push('.');
    s.push_str(&encode_topic(topic));
    s
}

/// The subjects a node subscribes to for a topic filter (without any
/// `$share/` prefix): one, or two for a filter ending in `/#`.
pub fn filter_subjects(space: &str, filter: &str) -> Vec<String> {
    let mut main = format!("{space}.");
    let mut parent: Option<String> = None;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if i > 0 {
            main.push('.');
        }
        match *level {
            "+" => main.push('*'),
            "#" => {
                if i > 0 {
                    // `a/#` matches `a`: the subject without the last `.`.
                    parent = Some(main[..main.len() - 1].to_string());
                }
                main.push('>');
            }
            l => encode_level(l, &mut main),
        }
    }
    let mut out = vec![main];
    out.extend(parent);
    out
}

/// Decode [`encode_topic`]'s output; `None` if it is not one.
pub fn decode_topic(encoded: &str) -> Option<String> {
    let mut out = Vec::with_capacity(encoded.len());
    for (i, level) in encoded.split('.').enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        if level == "_" {
            continue;
        }
        if level.is_empty() {
            return None;
        }
        let b = level.as_bytes();
        let mut j = 0;
        while j < b.len() {
            match b[j] {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => {
                    out.push(b[j]);
                    j += 1;
                }
                b'_' if b.get(j + 1) == Some(&b'_') => {
                    out.push(b'_');
                    j += 2;
                }
                b'_' => {
                    let hex = level.get(j + 1..j + 3)?;
                    let v = u8::from_str_radix(hex, 16).ok()?;
                    // Only what the encoder escapes, in its lower-case form;
                    // never `/`, which separates levels before escaping (an
                    // escaped one would decode two subjects to one topic —
                    // found by the fuzz target).
                    if v.is_ascii_alphanumeric()
                        || v == b'-'
                        || v == b'_'
                        || v == b'/'
                        || hex != format!("{v:02x}")
                    {
                        return None;
                    }
                    out.push(v);
                    j += 3;
                }
                _ => return None,
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A NATS queue group name for a shared subscription: the same on every
/// node for the same `$share/{group}/{filter}`.
pub fn queue_group(cluster: &str, group: &str, filter: &str) -> String {
    // `+` and `#` are escaped like any other byte: a filter's levels are
    // either wildcards or literals, so the name stays unambiguous.
    let mut q = format!("{cluster}.");
    encode_level(group, &mut q);
    q.push('.');
    q.push_str(&encode_topic(filter));
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics_and_filters() {
        assert_eq!(topic_subject("m2m.t", "a/b"), "m2m.t.a.b");
        assert_eq!(topic_subject("m2m.t", "/a//"), "m2m.t._.a._._");
        assert_eq!(
            topic_subject("m2m.t", "x.y z/$SYS"),
            "m2m.t.x_2ey_20z._24SYS"
        );
        assert_eq!(topic_subject("m2m.d", "a_b"), "m2m.d.a__b");
        assert_eq!(filter_subjects("m2m.t", "a/+/c"), vec!["m2m.t.a.*.c"]);
        assert_eq!(
            filter_subjects("m2m.t", "a/#"),
            vec!["m2m.t.a.>", "m2m.t.a"]
        );
        assert_eq!(filter_subjects("m2m.d", "#"), vec!["m2m.d.>"]);
        assert_eq!(filter_subjects("m2m.t", "+"), vec!["m2m.t.*"]);
        assert_eq!(queue_group("m2m", "g 1", "a/+/#"), "m2m.g_201.a._2b._23");
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "", "a..b", "_4", "_zz", "_61", "a*", "_2E", "a b", "siey._2f",
        ] {
            assert_eq!(decode_topic(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn encoding_round_trips(topic in "\\PC{0,40}") {
            let enc = encode_topic(&topic);
            prop_assert!(enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            prop_assert_eq!(decode_topic(&enc), Some(topic));
        }

        #[test]
        fn distinct_topics_get_distinct_subjects(a in "[a-c_./ ]{0,6}", b in "[a-c_./ ]{0,6}") {
            prop_assume!(a != b);
            prop_assert_ne!(topic_subject("c", &a), topic_subject("c", &b));
        }

        #[test]
        fn decoding_anything_never_panics(s in "\\PC{0,40}") {
            let _ = decode_topic(&s);
        }

        /// A NATS subscription on a filter's subjects receives every topic
        /// the MQTT filter matches (the receiver filters exactly).
        #[test]
        fn filter_subjects_cover_mqtt_matches(
            topic in "[ab]{0,2}(/[ab]{0,2}){0,3}",
            filter in "([ab+]{1}|[ab]{2})(/([ab+]|[ab]{2})){0,2}(/#)?",
        ) {
            if mqtt_codec::topic::matches(&filter, &topic) {
                let subject = topic_subject("c", &topic);
                prop_assert!(
                    filter_subjects("c", &filter).iter().any(|f| nats_matches(f, &subject)),
                    "{} !~ {}", filter, topic
                );
            }
        }
    }

    /// NATS subject matching, for the property above.
    fn nats_matches(filter: &str, subject: &str) -> bool {
        let f: Vec<&str> = filter.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, t) in f.iter().enumerate() {
            match *t {
                ">" => return s.len() > i,
                "*" => {
                    if i >= s.len() {
                        return false;
                    }
                }
                lit => {
                    if s.get(i) != Some(&lit) {
                        return false;
                    }
                }
            }
        }
        f.len() == s.len()
    }
}
