//! Bodies of the fuzz targets, kept in the library so that plain `cargo
//! test` replays the checked-in corpora (`fuzz/corpus/*`) on stable Rust.
//! Each panics (the fuzzer's signal) only if decoding panics or breaks an
//! invariant stated below.

use m2mhub_telemetry::Limits;

use crate::chirpstack::{decode_event_payload, DevEui, EventKind, EventTopic, Output};
use crate::sparkplug::{
    decode_payload, encode_payload, metric_value, DataType, Event, HostConfig, SparkplugHost,
};

/// Decode `data` as a Sparkplug B payload and read every metric under
/// every datatype; then feed it to a small host as each message type of
/// one session. Invariants: a decoded payload re-encodes to bytes that
/// decode to the same encoding (prost is canonical on its own output), and
/// the host never reports more points than the message had metrics.
pub fn sparkplug_payload(data: &[u8]) {
    if let Ok(payload) = decode_payload(data) {
        let encoded = encode_payload(&payload);
        let again = decode_payload(&encoded).expect("our own encoding decodes");
        assert_eq!(encode_payload(&again), encoded, "re-encoding is not stable");
        for metric in &payload.metrics {
            for dt in (0..=35).filter_map(DataType::from_code) {
                let _ = metric_value(metric, dt);
            }
        }
    }
    let metrics = decode_payload(data).map(|p| p.metrics.len()).unwrap_or(0);
    let mut host = SparkplugHost::new(HostConfig {
        max_nodes: 2,
        max_devices_per_node: 2,
        max_metrics_per_birth: 64,
        rebirth_interval_ms: 1_000,
    });
    let topics = [
        "spBv1.0/g/NBIRTH/n",
        "spBv1.0/g/NDATA/n",
        "spBv1.0/g/DBIRTH/n/d",
        "spBv1.0/g/DDATA/n/d",
        "spBv1.0/g/DDEATH/n/d",
        "spBv1.0/g/NDATA/other",
        "spBv1.0/g/NDEATH/n",
        "spBv1.0/g/NDATA/n",
    ];
    for (i, topic) in topics.into_iter().enumerate() {
        for event in host.handle(topic, data, 1_700_000_000_000 + i as i64) {
            if let Event::Points { points, .. } = event {
                assert!(points.len() <= metrics, "more points than metrics");
            }
        }
        assert!(host.node_count() <= 2, "node limit exceeded");
    }
}

/// Reading names this crate gives (link metrics, status, location).
const OWN_NAMES: [&str; 9] = [
    "rssi",
    "snr",
    "fcnt",
    "margin",
    "external_power_source",
    "battery_level",
    "latitude",
    "longitude",
    "altitude",
];

/// Decode `data` as the body of every ChirpStack event kind, with default
/// and tight limits. Invariants: the reading limits hold.
pub fn chirpstack_event(data: &[u8]) {
    let tight = Limits {
        max_points: 4,
        max_depth: 2,
        max_metric_len: 8,
    };
    let Ok(dev_eui) = DevEui::parse("0018b20000001a2b") else {
        unreachable!("a valid DevEUI literal")
    };
    for limits in [Limits::default(), tight] {
        for event in EventKind::ALL {
            let topic = EventTopic {
                application_id: "app".into(),
                dev_eui: dev_eui.clone(),
                event,
            };
            let Ok(decoded) = decode_event_payload(&topic, data, 0, &limits) else {
                continue;
            };
            let points = match &decoded.output {
                Output::Readings(points) => points,
                Output::Undecoded { link, .. } => link,
                _ => continue,
            };
            assert!(points.len() <= limits.max_points, "reading limit exceeded");
            for p in points {
                assert!(!p.metric.is_empty(), "empty name");
                // Names from the document are capped; the crate's own are fixed.
                assert!(
                    p.metric.len() <= limits.max_metric_len
                        || OWN_NAMES.contains(&p.metric.as_str()),
                    "name limit exceeded"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn corpus(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    fn replay(target: &str, body: fn(&[u8]), at_least: usize) {
        let mut n = 0;
        for entry in std::fs::read_dir(corpus(target)).expect("corpus directory exists") {
            let path = entry.expect("readable entry").path();
            body(&std::fs::read(&path).expect("readable corpus file"));
            n += 1;
        }
        assert!(n >= at_least, "{target} corpus has only {n} files");
    }

    #[test]
    fn sparkplug_payload_corpus() {
        replay("sparkplug_payload", sparkplug_payload, 4);
    }

    #[test]
    fn chirpstack_event_corpus() {
        replay("chirpstack_event", chirpstack_event, 4);
    }

    /// The Sparkplug seeds are this crate's own encodings of the flows in
    /// `sparkplug/tests.rs`. `M2MHUB_WRITE_CORPUS=1 cargo test -p
    /// m2mhub-gateways` rewrites them after a change to those payloads.
    #[test]
    fn sparkplug_seeds_are_our_encodings() {
        use crate::sparkplug::tests::{nbirth, ndata};
        let seeds = [
            ("nbirth", encode_payload(&nbirth(0, 3))),
            ("ndata", encode_payload(&ndata(1))),
        ];
        let dir = corpus("sparkplug_payload");
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if std::env::var_os("M2MHUB_WRITE_CORPUS").is_some() {
                std::fs::write(&path, &bytes).expect("writable corpus");
            }
            let on_disk = std::fs::read(&path).expect("seed exists");
            assert_eq!(on_disk, bytes, "{name} seed is stale");
        }
    }
}
