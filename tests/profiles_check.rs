//! `check_dir` over the shipped profiles and over broken ones, and the generic MQTT profiles
//! the demo relies on.

use std::path::Path;

use stonelion::model::{MetricName, ProfileName, ValueKind};
use stonelion::profile::{self, ProfileSet};
use stonelion::rules::spec::Condition;

#[test]
fn shipped_profiles_pass_check() {
    let problems = profile::check_dir(Path::new("device-profiles"));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn shipped_vendor_profiles_name_their_source() {
    let set = ProfileSet::load_dir(Path::new("device-profiles")).expect("loads");
    let vendor: Vec<_> = set.names().filter_map(|n| set.get(n)).filter(|p| !p.registers.is_empty()).collect();
    assert!(vendor.len() >= 6, "only {} Modbus profiles", vendor.len());
    for profile in vendor {
        assert!(profile.source.as_deref().is_some_and(|s| !s.is_empty()), "{} has no source", profile.name);
    }
}

#[test]
fn generic_mqtt_profiles_match_the_demo() {
    let set = ProfileSet::load_dir(Path::new("device-profiles")).expect("loads");
    let get = |name: &str| set.get(&ProfileName::new(name)).unwrap_or_else(|| panic!("{name} missing"));
    let metrics = |name: &str| get(name).metrics.iter().map(|m| m.name.to_string()).collect::<Vec<_>>();
    assert_eq!(metrics("gas-detector"), ["gas_lel"]);
    assert_eq!(metrics("smoke-detector"), ["smoke"]);
    assert_eq!(metrics("energy-meter"), ["energy_kwh", "power_kw", "voltage_v"]);
    assert_eq!(metrics("temperature-sensor"), ["temperature_c"]);

    let gas = get("gas-detector");
    assert_eq!(gas.metric(&MetricName::new("gas_lel")).and_then(|m| m.unit.as_deref()), Some("%LEL"));
    let rule = &gas.rules[0];
    assert_eq!(rule.id.as_str(), "gas-lel");
    assert_eq!(rule.condition, Condition::Threshold { above: true, level1: Some(25.0), level2: Some(50.0), deadband: 2.0 });

    let smoke = get("smoke-detector");
    assert_eq!(smoke.metrics[0].kind, ValueKind::Bool);
    assert_eq!(smoke.rules[0].id.as_str(), "smoke");
    assert_eq!(smoke.rules[0].condition, Condition::State { equals: true, level: 2 });

    let temperature = get("temperature-sensor");
    assert_eq!(temperature.metrics[0].unit.as_deref(), Some("°C"));
    assert_eq!(temperature.rules[0].id.as_str(), "temperature-high");
    assert_eq!(
        temperature.rules[0].condition,
        Condition::Threshold { above: true, level1: Some(60.0), level2: Some(80.0), deadband: 1.0 }
    );
}

fn check_one(file: &str, text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(file), text).expect("write profile");
    profile::check_dir(dir.path())
}

fn assert_one_problem(problems: &[String], parts: &[&str]) {
    assert_eq!(problems.len(), 1, "{problems:#?}");
    for part in parts {
        assert!(problems[0].contains(part), "`{}` lacks `{part}`", problems[0]);
    }
}

#[test]
fn overlapping_registers_are_reported() {
    let text = r#"
name = "overlap"
[[metrics]]
name = "power"
modbus = { register = 40001, type = "f32" }
[[metrics]]
name = "voltage"
modbus = { register = 40002, type = "u16" }
"#;
    assert_one_problem(&check_one("overlap.toml", text), &["overlap.toml", "`power`", "`voltage`", "fix one address"]);
}

#[test]
fn bits_of_one_status_word_may_share_it() {
    let text = r#"
name = "status"
[[metrics]]
name = "status_word"
modbus = { register = 40001 }
[[metrics]]
name = "alarm1"
kind = "bool"
modbus = { register = 40001, bit = 0 }
[[metrics]]
name = "alarm2"
kind = "bool"
modbus = { register = 40001, bit = 1 }
"#;
    assert!(check_one("status.toml", text).is_empty());
    let same_bit = text.replace("bit = 1", "bit = 0");
    assert_one_problem(&check_one("status.toml", &same_bit), &["`alarm1`", "`alarm2`"]);
}

#[test]
fn type_longer_than_span_is_reported() {
    let text = r#"
name = "span"
[[metrics]]
name = "energy"
modbus = { register = 30001, type = "f64", count = 2 }
"#;
    assert_one_problem(&check_one("span.toml", text), &["span.toml", "`energy`", "needs 4 registers", "fix the type or the count"]);
}

#[test]
fn unknown_key_is_reported() {
    let text = r#"
name = "typo"
[[metrics]]
name = "gas_lel"
modbus = { register = 40001, scael = 0.1 }
"#;
    assert_one_problem(&check_one("typo.toml", text), &["typo.toml", "scael"]);
}

#[test]
fn duplicate_metric_is_reported() {
    let text = r#"
name = "twice"
[[metrics]]
name = "gas_lel"
[[metrics]]
name = "gas_lel"
"#;
    assert_one_problem(&check_one("twice.toml", text), &["twice.toml", "`gas_lel`", "unique name"]);
}

#[test]
fn wrong_kind_and_vendor_notation_mismatch_are_reported() {
    let text = r#"
name = "kinds"
[[metrics]]
name = "alarm"
modbus = { register = 10001 }
[[metrics]]
name = "level"
modbus = { register = 30001, function = "holding_register" }
"#;
    let problems = check_one("kinds.toml", text);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].contains("`alarm`"), "{}", problems[0]);
    assert!(problems[0].contains("kind = \"bool\""), "{}", problems[0]);
    assert!(problems[1].contains("`level`"), "{}", problems[1]);
    assert!(problems[1].contains("input_register"), "{}", problems[1]);
}

#[test]
fn empty_directory_is_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let problems = profile::check_dir(dir.path());
    assert_one_problem(&problems, &["no *.toml profiles"]);
}
