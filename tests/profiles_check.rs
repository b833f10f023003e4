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
    let vendor: Vec<_> = set
        .names()
        .filter_map(|n| set.get(n))
        .filter(|p| !p.registers.is_empty())
        .collect();
    assert!(vendor.len() >= 6, "only {} Modbus profiles", vendor.len());
    for profile in vendor {
        let source = profile.source.as_deref().unwrap_or_default();
        assert!(!source.is_empty(), "{} has no source", profile.name);
        assert!(
            names_version(source)
                || source.contains("not confirmed")
                || source.contains("unversioned"),
            "{}: source `{source}` gives no document version or date and does not say it is unknown",
            profile.name
        );
    }
}

/// Whether `source` contains a version such as `v1.6` or `revision 12.05.2023`.
fn names_version(source: &str) -> bool {
    let words: Vec<&str> = source
        .split([' ', ',', '(', ')', ';'])
        .filter(|w| !w.is_empty())
        .collect();
    let starts_with_digit = |word: &str| word.chars().next().is_some_and(|c| c.is_ascii_digit());
    words
        .iter()
        .any(|w| w.strip_prefix('v').is_some_and(starts_with_digit))
        || words.windows(2).any(|pair| {
            ["revision", "version", "rev."].contains(&pair[0]) && starts_with_digit(pair[1])
        })
}

#[test]
fn source_version_check_rejects_bare_titles() {
    assert!(names_version(
        "IGD TOC-635 Plus manual, document SL-014 v1.6"
    ));
    assert!(names_version(
        "Evikon E2418-DP user manual, revision 12.05.2023"
    ));
    assert!(!names_version(
        "CHINT DTSU666 user manual ZTY0.464.1448, table 11"
    ));
    assert!(!names_version("Honeywell Midas manual, appendix A"));
}

#[test]
fn generic_mqtt_profiles_match_the_demo() {
    let set = ProfileSet::load_dir(Path::new("device-profiles")).expect("loads");
    let get = |name: &str| {
        set.get(&ProfileName::new(name))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let metrics = |name: &str| {
        get(name)
            .metrics
            .iter()
            .map(|m| m.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(metrics("gas-detector"), ["gas_lel"]);
    assert_eq!(metrics("smoke-detector"), ["smoke"]);
    assert_eq!(
        metrics("energy-meter"),
        ["energy_kwh", "power_kw", "voltage_v"]
    );
    assert_eq!(metrics("temperature-sensor"), ["temperature_c"]);

    let gas = get("gas-detector");
    assert_eq!(
        gas.metric(&MetricName::new("gas_lel"))
            .and_then(|m| m.unit.as_deref()),
        Some("%LEL")
    );
    let rule = &gas.rules[0];
    assert_eq!(rule.id.as_str(), "gas-lel");
    assert_eq!(
        rule.condition,
        Condition::Threshold {
            above: true,
            level1: Some(25.0),
            level2: Some(50.0),
            deadband: 2.0
        }
    );

    let smoke = get("smoke-detector");
    assert_eq!(smoke.metrics[0].kind, ValueKind::Bool);
    assert_eq!(smoke.rules[0].id.as_str(), "smoke");
    assert_eq!(
        smoke.rules[0].condition,
        Condition::State {
            equals: true,
            level: 2
        }
    );

    let temperature = get("temperature-sensor");
    assert_eq!(temperature.metrics[0].unit.as_deref(), Some("°C"));
    assert_eq!(temperature.rules[0].id.as_str(), "temperature-high");
    assert_eq!(
        temperature.rules[0].condition,
        Condition::Threshold {
            above: true,
            level1: Some(60.0),
            level2: Some(80.0),
            deadband: 1.0
        }
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
        assert!(
            problems[0].contains(part),
            "`{}` lacks `{part}`",
            problems[0]
        );
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
    assert_one_problem(
        &check_one("overlap.toml", text),
        &["overlap.toml", "`power`", "`voltage`", "fix one address"],
    );
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
    assert_one_problem(
        &check_one("status.toml", &same_bit),
        &["`alarm1`", "`alarm2`"],
    );
}

#[test]
fn packed_fields_share_a_word_without_overlap() {
    let text = r#"
name = "status"
[[metrics]]
name = "monitoring_state"
modbus = { register = 40001, bits = [0, 3], codes = { "0" = "warm-up", "1" = "monitoring" } }
[[metrics]]
name = "fault_state"
modbus = { register = 40001, bits = [4, 5] }
[[metrics]]
name = "alarm1"
kind = "bool"
modbus = { register = 40001, bit = 6 }
"#;
    assert!(check_one("fields.toml", text).is_empty());
    let overlap = text.replace("bit = 6", "bit = 5");
    assert_one_problem(
        &check_one("fields.toml", &overlap),
        &["`fault_state`", "`alarm1`", "both read bits 5 of"],
    );
    let three = text.replace("bits = [4, 5]", "bits = [4, 5, 9]");
    assert_one_problem(
        &check_one("fields.toml", &three),
        &["bits [4, 5, 9] are invalid", "write two numbers"],
    );
    let on_coil = text.replace(
        "register = 40001, bits = [4, 5]",
        "function = \"coil\", address = 7, bits = [4, 5]",
    );
    assert_one_problem(
        &check_one("fields.toml", &on_coil),
        &["bits", "do not apply to a coil"],
    );
    let reversed = text.replace("bits = [4, 5]", "bits = [5, 4]");
    assert_one_problem(
        &check_one("fields.toml", &reversed),
        &["bits [5, 4] are invalid", "first not above last"],
    );
    let past_end = text.replace("bits = [4, 5]", "bits = [12, 16]");
    assert_one_problem(&check_one("fields.toml", &past_end), &["bits [12, 16]"]);
    let wide_type = text.replace("bits = [4, 5]", "bits = [4, 5], type = \"u32\"");
    assert_one_problem(
        &check_one("fields.toml", &wide_type),
        &["`bits` needs type u16, not u32"],
    );
    let both = text.replace("bits = [4, 5]", "bits = [4, 5], bit = 4");
    assert_one_problem(&check_one("fields.toml", &both), &["not both"]);
}

#[test]
fn type_longer_than_span_is_reported() {
    let text = r#"
name = "span"
[[metrics]]
name = "energy"
modbus = { register = 30001, type = "f64", count = 2 }
"#;
    assert_one_problem(
        &check_one("span.toml", text),
        &[
            "span.toml",
            "`energy`",
            "needs 4 registers",
            "fix the type or the count",
        ],
    );
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
    assert_one_problem(
        &check_one("twice.toml", text),
        &["twice.toml", "`gas_lel`", "unique name"],
    );
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

#[test]
fn modbus_doc_config_snippets_parse() {
    let doc = std::fs::read_to_string("docs/modbus.md").expect("docs/modbus.md is readable");
    let snippets: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|snippet| snippet.contains("[[devices]]"))
        .collect();
    assert!(
        !snippets.is_empty(),
        "docs/modbus.md has no device config example"
    );
    for snippet in snippets {
        let text = format!(
            "[[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n\n{snippet}"
        );
        let parsed =
            stonelion::config::parse(&text, stonelion::config::builtin::builtin_profiles());
        assert!(
            parsed.is_ok(),
            "example does not parse: {:?}\n{snippet}",
            parsed.err()
        );
    }
}

fn polled_config(stale_after: &str, poll_interval: &str) -> String {
    format!(
        "[[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n\n\
         [[devices]]\nid = \"th-1\"\nsite = \"plant-a\"\nprofile = \"xy-md02\"\nstale_after = \"{stale_after}\"\n\n\
         [devices.modbus]\ntransport = \"tcp\"\naddress = \"127.0.0.1:502\"\npoll_interval = \"{poll_interval}\"\n"
    )
}

#[test]
fn polled_device_staleness_must_outlast_failed_polls() {
    let builtin = stonelion::config::builtin::builtin_profiles;
    // Three failed polls of 10 s take 30 s, so a 20 s staleness timeout would fire first.
    let problems =
        stonelion::config::parse(&polled_config("20s", "10s"), builtin()).expect_err("rejected");
    let text = format!("{problems:?}");
    assert!(text.contains("devices[0].stale_after"), "{text}");
    assert!(text.contains("offline_after_failures"), "{text}");
    let equal = stonelion::config::parse(&polled_config("30s", "10s"), builtin());
    assert!(
        equal.is_err(),
        "a timeout equal to three intervals is rejected"
    );
    let longer = stonelion::config::parse(&polled_config("31s", "10s"), builtin());
    assert!(longer.is_ok(), "{:?}", longer.err());
}
