//! The body of the `compile` fuzz target, kept in the library so that plain
//! `cargo test` replays the checked-in corpus on stable Rust.
//!
//! Rule text arrives from the API, so the compiler faces the network: any
//! bytes must give a rule or a positioned error, never a panic or a hang;
//! a rule that compiles must survive messages and ticks of any shape.

use crate::CompiledRule;
use serde_json::json;

/// Compile `data` as rule text; when it compiles, feed it a few messages
/// of different shapes and clock ticks.
pub fn compile_and_run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match CompiledRule::compile(text) {
        Err(e) => {
            // Positions point into the text.
            assert!(e.position.offset <= text.len(), "error offset past the end");
            assert!(e.position.line >= 1 && e.position.column >= 1);
        }
        Ok(mut rule) => {
            let payloads = [
                json!({"temperature": 90.5, "vibration": 8, "lat": 48.9, "lon": 2.35, "device": "m1"}),
                json!({"temperature": "hot", "nested": {"x": [1, 2, 3]}}),
                json!(42),
                json!(null),
                json!({}),
            ];
            let mut t = 1_700_000_000_000i64;
            for (i, p) in payloads.iter().enumerate() {
                let topic = if i % 2 == 0 {
                    "devices/m1/telemetry"
                } else {
                    "devices/m2/location"
                };
                let _ = rule.on_message(topic, p, t);
                t += 7_000;
                let _ = rule.on_tick(t);
            }
            let _ = rule.on_tick(i64::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn fuzz_corpus() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/compile");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("corpus directory exists") {
            let path = entry.expect("readable entry").path();
            let data = std::fs::read(&path).expect("readable corpus file");
            compile_and_run(&data);
            n += 1;
        }
        assert!(n >= 10, "corpus has only {n} files");
    }
}
