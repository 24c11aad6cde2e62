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

/// Decimal sensor readings (the case the decimal format exists for), with
/// occasional non-decimal values that must force the Gorilla fallback.
fn decimal_points() -> impl Strategy<Value = Vec<(i64, f64)>> {
    (
        any::<i64>(),
        0u32..10,
        prop::collection::vec((-3000i64..3000, -50i64..50, 0u8..40), 1..300),
    )
        .prop_map(|(start, e, steps)| {
            let p = 10f64.powi(e as i32);
            let mut t = start;
            let mut n = 2137i64;
            steps
                .into_iter()
                .map(|(dt, dn, odd)| {
                    t = t.wrapping_add(dt);
                    n += if odd == 0 { dn * 1_000_000 } else { dn };
                    let v = match odd {
                        1 => f64::NAN,
                        2 => f64::INFINITY,
                        3 => -0.0,
                        4 => 0.1 + 0.2,
                        _ => n as f64 / p,
                    };
                    (t, v)
                })
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn encode_best_roundtrips_bit_exactly(points in prop_oneof![
        decimal_points(),
        points().prop_map(|v| v.into_iter().map(|(t, b)| (t, f64::from_bits(b))).collect()),
    ]) {
        let bytes = m2mhub_tsdb::chunk::encode_best(&points);
        let decoded = decode_chunk(&bytes).unwrap();
        prop_assert_eq!(decoded.len(), points.len());
        for (a, b) in points.iter().zip(&decoded) {
            prop_assert_eq!(a.0, b.0);
            prop_assert_eq!(a.1.to_bits(), b.1.to_bits());
        }
        // Never bigger than plain Gorilla.
        let mut enc = ChunkEncoder::new();
        for &(t, v) in &points {
            enc.push(t, v);
        }
        prop_assert!(bytes.len() <= enc.finish().len());
    }

    #[test]
    fn decimal_chunks_reject_corruption(points in decimal_points(), at in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut bytes = m2mhub_tsdb::chunk::encode_best(&points);
        let len = at.index(bytes.len());
        prop_assert!(decode_chunk(&bytes[..len]).is_err());
        bytes[len] ^= mask;
        if let Ok(iter) = ChunkIter::new(&bytes) {
            prop_assert!(iter.count() <= 2 + bytes.len() * 4);
        }
    }
}

#[test]
fn decimal_sensor_data_is_smaller_than_gorilla() {
    let pts: Vec<(i64, f64)> = (0..86_400)
        .map(|i| {
            let raw = 21.0 + 4.0 * ((i as f64) / 7200.0).sin() + 0.3 * ((i as f64) / 97.0).sin();
            (1_700_000_000_000 + i * 1000, (raw * 100.0).round() / 100.0)
        })
        .collect();
    let best = m2mhub_tsdb::chunk::encode_best(&pts);
    assert_eq!(best[1], m2mhub_tsdb::chunk::VERSION_DECIMAL);
    let mut enc = ChunkEncoder::new();
    for &(t, v) in &pts {
        enc.push(t, v);
    }
    let gorilla = enc.finish();
    assert!(
        best.len() * 2 < gorilla.len(),
        "decimal {} vs gorilla {}",
        best.len(),
        gorilla.len()
    );
}
