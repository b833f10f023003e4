//! Runs every fuzz target over its stored corpus in `fuzz/corpus/<target>/`, on stable
//! Rust and without libFuzzer, so CI replays the inputs that fuzzing found interesting.
//! The targets live in `fuzz/src/targets.rs`, shared with `cargo fuzz`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/targets.rs"]
mod targets;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "the corpus {} is empty", dir.display());
    inputs
}

/// Runs `target` on every input, naming the input that panics.
fn replay(name: &str, target: fn(&[u8])) {
    for (path, bytes) in corpus(name) {
        let outcome = std::panic::catch_unwind(|| target(&bytes));
        assert!(
            outcome.is_ok(),
            "fuzz target {name} panicked on {}",
            path.display()
        );
    }
}

#[test]
fn corpus_mqtt_payload() {
    replay("mqtt_payload", targets::mqtt_payload);
}

#[test]
fn corpus_line_protocol() {
    replay("line_protocol", targets::line_protocol);
}

#[test]
fn corpus_influxql() {
    replay("influxql", targets::influxql);
}

#[test]
fn corpus_modbus_decode() {
    replay("modbus_decode", targets::modbus_decode);
}

#[test]
fn corpus_config() {
    replay("config", targets::config);
}

#[test]
fn corpus_profile() {
    replay("profile", targets::profile);
}

#[test]
fn modbus_scaled_overflow_rejected() {
    // A u32 of 0xFFFFFFFF times a scale of 1e300 overflows to infinity, which must not
    // become a reading: MQTT and HTTP ingest reject non-finite values too.
    use stonelion::modbus::decode::{DecodeError, decode_words};
    use stonelion::profile::{DataType, Function, RegisterSpec};

    let spec = RegisterSpec {
        function: Some(Function::HoldingRegister),
        address: Some(0),
        register: None,
        data_type: Some(DataType::U32),
        count: None,
        bit: None,
        bits: None,
        order: Default::default(),
        scale: 1e300,
        offset: 0.0,
        valid_min: None,
        valid_max: None,
        no_value: Vec::new(),
        codes: Default::default(),
    };
    let register = spec.check().unwrap();
    assert_eq!(
        decode_words(&register, &[0xFFFF, 0xFFFF]),
        Err(DecodeError::NotFinite)
    );
}
