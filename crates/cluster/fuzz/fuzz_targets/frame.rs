#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    m2mhub_cluster::fuzz::frame(data);
});
