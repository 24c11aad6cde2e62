//! Encode/decode throughput over 10 M points (plain `Instant`, no harness).
//!
//! Run with `cargo bench -p m2mhub-tsdb`.

use std::hint::black_box;
use std::time::Instant;

use m2mhub_tsdb::{decode_chunk, ChunkEncoder, ChunkIter};

const N: i64 = 10_000_000;

fn main() {
    // A regular 1 s sensor with occasional timestamp jitter.
    let points: Vec<(i64, f64)> = (0..N)
        .map(|t| {
            let jitter = if t % 97 == 0 { 3 } else { 0 };
            let raw = 20.0 + 5.0 * (t as f64 / 3600.0).sin();
            (
                1_700_000_000_000 + t * 1000 + jitter,
                (raw * 10.0).round() / 10.0,
            )
        })
        .collect();

    let start = Instant::now();
    let mut enc = ChunkEncoder::new();
    for &(t, v) in black_box(&points) {
        enc.push(t, v);
    }
    let bytes = black_box(enc.finish());
    let enc_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let decoded = black_box(decode_chunk(black_box(&bytes)).expect("decode"));
    let dec_s = start.elapsed().as_secs_f64();
    assert_eq!(decoded.len(), points.len());

    let start = Instant::now();
    let mut sum = 0.0;
    for p in ChunkIter::new(black_box(&bytes)).expect("header") {
        sum += p.expect("point").1;
    }
    black_box(sum);
    let iter_s = start.elapsed().as_secs_f64();

    let n = N as f64;
    println!(
        "chunk: {N} points, {} bytes ({:.3} bytes/point)",
        bytes.len(),
        bytes.len() as f64 / n
    );
    println!("encode:          {:>8.1} M points/s", n / enc_s / 1e6);
    println!("decode (Vec):    {:>8.1} M points/s", n / dec_s / 1e6);
    println!("decode (iter):   {:>8.1} M points/s", n / iter_s / 1e6);
}
