//! Bodies of the fuzz targets, kept in the library so that plain `cargo
//! test` replays the checked-in corpora (`fuzz/corpus/*`) on stable Rust.
