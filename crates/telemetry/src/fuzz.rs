//! The body of the `decode` fuzz target, kept in the library so that plain
//! `cargo test` can replay the checked-in corpus on stable Rust.

use crate::{decode, sniff, ContentType, Limits};

/// Decode `data` under every content type and with sniffing, with default
/// and tight limits. Panics (the fuzzer's signal) only if decoding panics
/// or breaks an invariant: the point limit, the metric-name limit, or a
/// sniffed decode disagreeing with decoding under the sniffed type.
pub fn decode_all(data: &[u8]) {
    let tight = Limits {
        max_points: 3,
        max_depth: 2,
        max_metric_len: 8,
    };
    for limits in [Limits::default(), tight] {
        for ct in [
            None,
            Some(ContentType::Json),
            Some(ContentType::SenmlJson),
            Some(ContentType::SenmlCbor),
            Some(ContentType::Cbor),
            Some(ContentType::PlainNumber),
        ] {
            if let Ok(points) = decode(data, ct, 1_700_000_000_000, &limits) {
                assert!(points.len() <= limits.max_points, "point limit exceeded");
                for p in &points {
                    assert!(!p.metric.is_empty(), "empty metric");
                    assert!(
                        p.metric.len() <= limits.max_metric_len,
                        "name limit exceeded"
                    );
                }
            }
        }
    }
    if let Some(ct) = sniff(data) {
        let limits = Limits::default();
        let sniffed = decode(data, None, 0, &limits);
        let explicit = decode(data, Some(ct), 0, &limits);
        // NaN-carrying CBOR values compare unequal to themselves.
        if format!("{sniffed:?}") != format!("{explicit:?}") {
            panic!("sniffed {ct:?} decode differs: {sniffed:?} vs {explicit:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn corpus_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode")
    }

    #[test]
    fn fuzz_corpus() {
        let mut n = 0;
        for entry in std::fs::read_dir(corpus_dir()).expect("corpus directory exists") {
            let path = entry.expect("readable entry").path();
            let data = std::fs::read(&path).expect("readable corpus file");
            decode_all(&data);
            n += 1;
        }
        assert!(n >= 10, "corpus has only {n} files");
    }
}
