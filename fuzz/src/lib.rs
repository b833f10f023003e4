//! The fuzz targets as plain functions, so `cargo fuzz` and the stable corpus test in
//! `tests/fuzz_corpus.rs` run the same code.

#[path = "targets.rs"]
pub mod targets;
