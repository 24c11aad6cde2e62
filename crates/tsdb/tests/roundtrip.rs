//! Property tests: exact round-trip and robustness against corrupt input.

use m2mhub_tsdb::{decode_chunk, ChunkEncoder, ChunkIter};
use proptest::prelude::*;

fn encode(points: &[(i64, u64)]) -> Vec<u8> {
    let mut enc = ChunkEncoder::new();
    for &(t, v) in points {
        enc.push(t, f64::from_bits(v));
    }
    enc.finish()
}

/// Mix of fully arbitrary values and realistic, slowly varying ones so that
/// every branch (window reuse, dod buckets) is exercised.
fn points() -> impl Strategy<Value = Vec<(i64, u64)>> {
    let arbitrary = prop::collection::vec((any::<i64>(), any::<u64>()), 0..64);
    let regular = (
        any::<i64>(),
        prop::collection::vec((-3000i64..3000, -4i32..4, prop::bool::ANY), 0..200),
    )
        .prop_map(|(start, steps)| {
            let mut t = start;
            let mut v = 20.0f64;
            steps
                .into_iter()
                .map(|(dt, dv, nan)| {
                    t = t.wrapping_add(dt);
                    v += f64::from(dv) * 0.1;
                    let bits = if nan && dv == 3 {
                        0x7FF8_0000_0000_0000 | (dt as u64 & 0xFFFF)
                    } else {
                        v.to_bits()
                    };
                    (t, bits)
                })
                .collect()
        });
    prop_oneof![arbitrary, regular]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_chunk(&bytes);
        // Also with a valid header in front, so the bit stream is reached.
        bytes.splice(0..0, [m2mhub_tsdb::chunk::MAGIC, m2mhub_tsdb::chunk::VERSION]);
        let _ = decode_chunk(&bytes);
    }

    #[test]
    fn roundtrip(points in points()) {
        let bytes = encode(&points);
        let decoded = decode_chunk(&bytes).unwrap();
        prop_assert_eq!(decoded.len(), points.len());
        for (a, b) in points.iter().zip(&decoded) {
            prop_assert_eq!(a.0, b.0);
            prop_assert_eq!(a.1, b.1.to_bits());
        }
    }

    #[test]
    fn truncation_is_an_error(points in points(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&points);
        let len = cut.index(bytes.len());
        prop_assert!(decode_chunk(&bytes[..len]).is_err());
        if let Ok(iter) = ChunkIter::new(&bytes[..len]) {
            prop_assert!(iter.last().is_some_and(|r| r.is_err()));
        }
    }

    #[test]
    fn byte_flip_never_panics(
        points in points(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let mut bytes = encode(&points);
        let i = at.index(bytes.len());
        bytes[i] ^= mask;
        if let Ok(decoded) = decode_chunk(&bytes) {
            // A flip may still decode (e.g. inside a raw value) but must not
            // invent an absurd number of points.
            prop_assert!(decoded.len() <= 1 + bytes.len() * 4);
        }
        if let Ok(iter) = ChunkIter::new(&bytes) {
            prop_assert!(iter.count() <= 2 + bytes.len() * 4);
        }
    }
}
