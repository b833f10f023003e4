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
fn corpus_mqtt_connect() {
    replay("mqtt_connect", targets::mqtt_connect);
}

#[test]
fn corpus_certificate_common_name() {
    replay("certificate_common_name", targets::certificate_common_name);
}

#[test]
fn corpus_publish_header() {
    replay("publish_header", targets::publish_header);
}

#[test]
fn corpus_mqtt_guard() {
    replay("mqtt_guard", targets::mqtt_guard);
}

/// Checks that each seed copied from a shipped file still equals it. A stale seed makes
/// the fuzzer rediscover, one byte at a time, every key added since the copy.
#[test]
fn seeds_match_shipped_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pairs = vec![
        (
            "stonelion.example.toml".to_string(),
            "fuzz/corpus/config/example.toml".to_string(),
        ),
        (
            "src/demo/demo.toml".to_string(),
            "fuzz/corpus/config/demo.toml".to_string(),
        ),
    ];
    for entry in std::fs::read_dir(root.join("device-profiles")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".toml") {
            pairs.push((
                format!("device-profiles/{name}"),
                format!("fuzz/corpus/profile/{name}"),
            ));
        }
    }
    for (shipped, seed) in pairs {
        let expected = std::fs::read(root.join(&shipped)).unwrap();
        let found = std::fs::read(root.join(&seed)).unwrap_or_default();
        assert!(
            found == expected,
            "the fuzz seed {seed} differs from {shipped}; copy it: cp {shipped} {seed}"
        );
    }
}

#[test]
fn certificate_cn_string_types_read() {
    // A BMPString common name was read as UTF-8, so "gas-01" came out as
    // "\0g\0a\0s\0-\00\01", and other UTF-16 bytes could read as another device id.
    use rcgen::{BmpString, CertificateParams, DnType, DnValue, KeyPair, UniversalString};
    use stonelion::fuzzing::subject_common_name;

    let key = KeyPair::generate().unwrap();
    let cases = [
        (
            "UTF8String",
            DnValue::Utf8String("gas-01".to_owned()),
            Some("gas-01"),
        ),
        (
            "BMPString",
            DnValue::BmpString(BmpString::try_from("gas-01").unwrap()),
            Some("gas-01"),
        ),
        (
            "UniversalString",
            DnValue::UniversalString(UniversalString::try_from("gas-01").unwrap()),
            Some("gas-01"),
        ),
        (
            "TeletexString",
            DnValue::TeletexString("gas-01".try_into().unwrap()),
            None,
        ),
    ];
    for (name, value, expected) in cases {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, value);
        let certificate = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_common_name(certificate.der()).as_deref(),
            expected,
            "common name as {name}"
        );
    }
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

/// Runs one of the corpus scripts of `fuzz/scripts/` and returns the files it wrote.
fn run_script(args: &[&str], out: &Path) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("STONELION_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let status = std::process::Command::new(&python)
        .args(args)
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot start {python}: {e}; install Python 3.11 or newer"));
    assert!(status.success(), "{args:?} failed with {status}");
    let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(out)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect();
    files.sort();
    for (path, text) in &files {
        if let Err(e) = text.parse::<toml::Table>() {
            panic!("{} is not valid TOML: {e}", path.display());
        }
    }
    files
}

/// Parses every file, then asserts that some passed and that the problems of the others
/// name every listed check.
fn assert_reaches(
    input_kind: &str,
    files: &[(PathBuf, String)],
    parse: impl Fn(&str) -> Result<(), Vec<String>>,
    checks: &[&str],
) {
    let mut accepted = 0;
    let mut messages = Vec::new();
    for (_, text) in files {
        match parse(text) {
            Ok(()) => accepted += 1,
            Err(problems) => messages.extend(problems),
        }
    }
    assert!(
        accepted > 0,
        "no {input_kind} was accepted; the first problems: {:?}",
        &messages[..messages.len().min(5)]
    );
    for check in checks {
        assert!(
            messages.iter().any(|m| m.contains(check)),
            "no {input_kind} reached the check that says `{check}`"
        );
    }
}

#[test]
fn profile_combinations_reach_register_checks() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let files = run_script(
        &["fuzz/scripts/profile_combinations.py", dir, "2000", "7"],
        out.path(),
    );
    assert_eq!(files.len(), 2000);
    let checks = [
        "not both",
        "but `function` says",
        "runs past 65535",
        "a register has bits 0 to 15",
        "first not above last",
        "string length",
        "but `count` is",
        "swap them",
        "is not a decimal integer",
        "overlaps metric",
        "both read bits",
        "must be greater than level1",
    ];
    let parse = |text: &str| {
        stonelion::profile::parse(text, None)
            .map(drop)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect())
    };
    assert_reaches("combined profile", &files, parse, &checks);
}

#[test]
fn config_combinations_reach_entry_checks() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let files = run_script(
        &["fuzz/scripts/config_combinations.py", dir, "1000", "7"],
        out.path(),
    );
    assert_eq!(files.len(), 1000);
    let checks = [
        "applies to transport rtu only",
        "is invalid on a serial bus",
        "unknown site",
        "is a device id",
        "has no metric",
        "rule cannot watch",
        "is not supported",
        "unknown profile",
    ];
    let builtin = stonelion::config::builtin::builtin_profiles();
    let parse = |text: &str| {
        stonelion::config::parse(text, builtin.clone())
            .map(drop)
            .map_err(|problems| problems.iter().map(ToString::to_string).collect())
    };
    assert_reaches("combined config", &files, parse, &checks);
}

#[test]
fn toml_recombine_writes_documents_and_type_sweeps() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = tempfile::tempdir().unwrap();
    for seed in ["example.toml", "demo.toml"] {
        std::fs::copy(
            root.join("fuzz/corpus/config").join(seed),
            corpus.path().join(seed),
        )
        .unwrap();
    }
    let corpus_dir = corpus.path().to_str().unwrap();

    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let files = run_script(
        &[
            "fuzz/scripts/toml_recombine.py",
            corpus_dir,
            out_dir,
            "300",
            "7",
        ],
        out.path(),
    );
    assert_eq!(files.len(), 300);

    let sweep = tempfile::tempdir().unwrap();
    let sweep_dir = sweep.path().to_str().unwrap();
    let files = run_script(
        &[
            "fuzz/scripts/toml_recombine.py",
            "--sweep",
            corpus_dir,
            sweep_dir,
        ],
        sweep.path(),
    );
    assert!(
        files.len() > 100,
        "the sweep wrote only {} files",
        files.len()
    );
    // Most sweep values have a type that their key does not take.
    let builtin = stonelion::config::builtin::builtin_profiles();
    let type_errors = files
        .iter()
        .filter(
            |(_, text)| match stonelion::config::parse(text, builtin.clone()) {
                Ok(_) => false,
                Err(problems) => problems.iter().any(|p| p.message.contains("invalid type")),
            },
        )
        .count();
    assert!(
        type_errors * 2 > files.len(),
        "only {type_errors} of {} sweep documents gave a type error",
        files.len()
    );
}

/// Writes an executable that prints `report` to stderr and exits with `status`, as a
/// fuzz target replaying a corpus with `-print_coverage=1` does.
fn fake_target(dir: &Path, name: &str, report: &str, status: i32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let script = format!("#!/bin/sh\ncat >&2 <<'REPORT'\n{report}REPORT\nexit {status}\n");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs `fuzz/scripts/own_edges.py` and returns its output.
fn run_own_edges(args: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("STONELION_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    std::process::Command::new(&python)
        .arg("fuzz/scripts/own_edges.py")
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {python}: {e}; install Python 3"))
}

/// Runs `fuzz/scripts/own_edges.py`, asserts that it succeeded and returns its standard
/// output.
fn own_edges_stdout(args: &[&str]) -> String {
    let output = run_own_edges(args);
    assert!(
        output.status.success(),
        "own_edges.py {args:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn own_edges_counts_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("my repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("input"), "x").unwrap();
    let src = repo.join("src");
    let src = src.to_str().unwrap();

    // `from_str` and `check_limits` are covered in both reports, `parse_line` only
    // before, `check_cors` and a serde visitor that inlines a line of `src/` only after.
    let before_report = format!(
        "\
COVERED_FUNC: hits: 3 edges: 5/9 <stonelion::Origin as core::str::FromStr>::from_str {src}/config/mod.rs:700
  UNCOVERED_PC: {src}/config/mod.rs:710
  UNCOVERED_PC: {src}/config/mod.rs:712
  UNCOVERED_PC: /rustc/abc/library/core/src/ub_checks.rs:73
  UNCOVERED_PC: /deps/hashbrown-0.16.1/src/control/bitmask.rs:50
COVERED_FUNC: hits: 1 edges: 2/5 toml::de::parse /deps/toml/src/de.rs:10
  UNCOVERED_PC: /deps/toml/src/de.rs:12
  UNCOVERED_PC: {src}/config/spec.rs:40
  UNCOVERED_PC: {src}x/other.rs:1
COVERED_FUNC: hits: 4 edges: 4/6 stonelion::config::check_limits {src}/config/mod.rs:800
  UNCOVERED_PC: {src}/config/mod.rs:801
COVERED_FUNC: hits: 1 edges: 1/4 stonelion::config::parse_line {src}/config/mod.rs:900
"
    );
    // The fuzzer covered line 710 and a hash probe in `from_str`, while a shortened input
    // lost line 801 of `check_limits` and all of `parse_line`.
    let after_report = format!(
        "\
COVERED_FUNC: hits: 9 edges: 7/9 <stonelion::Origin as core::str::FromStr>::from_str {src}/config/mod.rs:700
  UNCOVERED_PC: {src}/config/mod.rs:712
  UNCOVERED_PC: /rustc/abc/library/core/src/ub_checks.rs:73
COVERED_FUNC: hits: 1 edges: 2/5 toml::de::parse /deps/toml/src/de.rs:10
  UNCOVERED_PC: /deps/toml/src/de.rs:12
  UNCOVERED_PC: {src}/config/spec.rs:40
  UNCOVERED_PC: {src}x/other.rs:1
COVERED_FUNC: hits: 4 edges: 3/6 stonelion::config::check_limits {src}/config/mod.rs:800
  UNCOVERED_PC: {src}/config/mod.rs:801
  UNCOVERED_PC: {src}/config/mod.rs:801
COVERED_FUNC: hits: 2 edges: 3/3 stonelion::config::check_cors {src}/config/mod.rs:690
COVERED_FUNC: hits: 2 edges: 2/7 serde::de::Visitor::visit_map /deps/serde/src/de.rs:30
  UNCOVERED_PC: {src}/config/spec.rs:12
COVERED_FUNC: hits: 2 edges: 2/2 alloc::vec::Vec::push /rustc/abc/library/alloc/src/vec/mod.rs:5
"
    );
    let before_target = fake_target(dir.path(), "before", &before_report, 0);
    let after_target = fake_target(dir.path(), "after", &after_report, 0);
    let before_json = dir.path().join("before.json");
    let after_json = dir.path().join("after.json");
    let repo = repo.to_str().unwrap();
    let corpus = corpus.to_str().unwrap();
    let count = |target: &Path, json: &Path| {
        let target = target.to_str().unwrap();
        let json = json.to_str().unwrap();
        own_edges_stdout(&["count", "--src", repo, target, json, corpus])
    };

    assert_eq!(
        count(&before_target, &before_json).trim(),
        "own 10 in 3 functions; uncovered on src/ lines 4 in 4 covered functions"
    );
    // Both reports come from fake targets, so mark them as one build.
    let after_count = count(&after_target, &after_json);
    assert_eq!(
        after_count.trim(),
        "own 13 in 3 functions; uncovered on src/ lines 5 in 6 covered functions"
    );
    let mut after_data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&after_json).unwrap()).unwrap();
    let before_data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&before_json).unwrap()).unwrap();
    after_data["binary_sha256"] = before_data["binary_sha256"].clone();
    std::fs::write(&after_json, after_data.to_string()).unwrap();

    let before_json = before_json.to_str().unwrap();
    let after_json = after_json.to_str().unwrap();
    let comparison = own_edges_stdout(&["compare", before_json, after_json]);
    let lines: Vec<&str> = comparison.lines().collect();
    let origin =
        format!("<stonelion::Origin as core::str::FromStr>::from_str at {src}/config/mod.rs:700");
    assert_eq!(
        lines,
        [
            format!("+1 config/mod.rs:710 in {origin}"),
            format!(
                "newly covered function: serde::de::Visitor::visit_map at /deps/serde/src/de.rs:30, \
                 2/7 edges, not own, with src/ lines"
            ),
            format!(
                "newly covered function: stonelion::config::check_cors at {src}/config/mod.rs:690, \
                 3/3 edges, own"
            ),
            format!(
                "-1 config/mod.rs:801 in stonelion::config::check_limits at {src}/config/mod.rs:800"
            ),
            format!(
                "no longer covered function: stonelion::config::parse_line at {src}/config/mod.rs:900"
            ),
            "own 10 -> 13; edges gained on src/ lines 0; newly covered functions: 1 own with 3 \
             edges, 1 others with src/ lines and 2 edges"
                .to_owned(),
        ]
    );

    // The two fake targets are different files, so their counts do not compare.
    let after_target_json = dir.path().join("after-target.json");
    count(&after_target, &after_target_json);
    let mismatch = run_own_edges(&["compare", before_json, after_target_json.to_str().unwrap()]);
    assert!(!mismatch.status.success());
    assert!(String::from_utf8_lossy(&mismatch.stderr).contains("different builds"));

    // A crash during the replay is reported with the text before the coverage report.
    let crash_report =
        format!("==1==ERROR: AddressSanitizer: heap-buffer-overflow\nCOVERAGE:\n{after_report}");
    let crashing = fake_target(dir.path(), "crashing", &crash_report, 1);
    let crashing = crashing.to_str().unwrap();
    let crashed = run_own_edges(&["count", "--src", repo, crashing, "/dev/null", corpus]);
    let message = String::from_utf8_lossy(&crashed.stderr);
    assert!(!crashed.status.success());
    assert!(
        message.contains("exited with status 1 during the replay"),
        "{message}"
    );
    assert!(message.contains("heap-buffer-overflow"), "{message}");
    assert!(!message.contains("UNCOVERED_PC"), "{message}");

    // A root other than the build's is rejected, first because it has no `src/` folder,
    // then because no covered function is in it.
    let elsewhere = dir.path().to_str().unwrap();
    let after_target = after_target.to_str().unwrap();
    let wrong_root_args = [
        "count",
        "--src",
        elsewhere,
        after_target,
        "/dev/null",
        corpus,
    ];
    let wrong_root = run_own_edges(&wrong_root_args);
    assert!(!wrong_root.status.success());
    assert!(String::from_utf8_lossy(&wrong_root.stderr).contains("has no src/ folder"));

    std::fs::create_dir(dir.path().join("src")).unwrap();
    let wrong_root = run_own_edges(&wrong_root_args);
    assert!(!wrong_root.status.success());
    assert!(String::from_utf8_lossy(&wrong_root.stderr).contains("no covered function is in"));
}
