//! Compression ratio on realistic and adversarial series.

use m2mhub_tsdb::{decode_chunk, ChunkEncoder};

const DAY: i64 = 86_400;
const START_MS: i64 = 1_700_000_000_000;

fn encode(points: impl Iterator<Item = (i64, f64)>) -> (usize, Vec<u8>) {
    let mut enc = ChunkEncoder::new();
    for (t, v) in points {
        enc.push(t, v);
    }
    (enc.len(), enc.finish())
}

/// A day of a 1 s temperature sensor reporting to 0.1 resolution.
fn sensor(t: i64) -> f64 {
    let raw = 20.0 + 5.0 * (t as f64 / 3600.0).sin();
    (raw * 10.0).round() / 10.0
}

#[test]
fn regular_sensor_series_at_most_two_bytes_per_point() {
    let (n, bytes) = encode((0..DAY).map(|t| (START_MS + t * 1000, sensor(t))));
    let bpp = bytes.len() as f64 / n as f64;
    println!(
        "sensor series: {n} points -> {} bytes = {bpp:.3} bytes/point",
        bytes.len()
    );
    assert!(bpp <= 2.0, "{bpp} bytes/point");
    let decoded = decode_chunk(&bytes).unwrap();
    assert_eq!(decoded.len(), n);
    for (t, &(ts, v)) in decoded.iter().enumerate() {
        assert_eq!(ts, START_MS + t as i64 * 1000);
        assert_eq!(v.to_bits(), sensor(t as i64).to_bits());
    }
}

#[test]
fn random_float_series_for_the_record() {
    // xorshift64*: deterministic, no dependency.
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let values: Vec<f64> = (0..DAY)
        .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64)
        .collect();
    let (n, bytes) = encode(
        values
            .iter()
            .enumerate()
            .map(|(t, &v)| (START_MS + t as i64 * 1000, v)),
    );
    let bpp = bytes.len() as f64 / n as f64;
    println!(
        "random [0,1) series: {n} points -> {} bytes = {bpp:.3} bytes/point",
        bytes.len()
    );
    // Incompressible mantissas: 8 bytes of value plus a few bits of overhead.
    assert!(bpp < 9.0, "{bpp} bytes/point");
    let decoded = decode_chunk(&bytes).unwrap();
    assert!(decoded
        .iter()
        .zip(&values)
        .all(|(d, v)| d.1.to_bits() == v.to_bits()));
}
