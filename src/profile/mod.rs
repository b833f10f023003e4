//! Device profiles: one TOML file per device type in `device-profiles/`, listing its metrics,
//! where a Modbus device keeps them, and its default rules.

pub mod check;
pub mod register;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::model::{MetricName, ProfileName, ValueKind};
use crate::rules::spec::{Rule, RuleSpec};

pub use check::check_dir;
pub use register::{ByteOrder, DataType, Function, Register, RegisterSpec};

/// A profile file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// Profile name that devices refer to; the file name without `.toml` by convention.
    pub name: ProfileName,
    /// What the device type is.
    #[serde(default)]
    pub description: String,
    /// The vendor document the profile was taken from, with its version.
    #[serde(default)]
    pub source: Option<String>,
    /// Metrics the device reports.
    #[serde(default)]
    pub metrics: Vec<MetricSpec>,
    /// Default rules for every device of this type.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Defaults for polling devices of this type over Modbus.
    #[serde(default)]
    pub modbus: Option<ProfileModbusSpec>,
}

/// Modbus defaults of a device type, as written under `[modbus]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileModbusSpec {
    /// Default time between polls, such as `"5s"`; a device's `poll_interval` overrides it.
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    /// Most registers the device accepts in one read, from its manual; at most 125.
    #[serde(default)]
    pub max_registers_per_read: Option<u16>,
}

/// One metric of a device type.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Metric name, as used in MQTT payloads, the API and storage.
    pub name: MetricName,
    /// Unit of the value, such as `%LEL`, `ppm`, `°C` or `kWh`.
    #[serde(default)]
    pub unit: Option<String>,
    /// `number` or `bool`. Bits, coils and discrete inputs must be `bool`.
    #[serde(default = "default_kind")]
    pub kind: ValueKind,
    /// What the metric means, for operators.
    #[serde(default)]
    pub description: String,
    /// Where a Modbus device keeps the metric; absent for metrics that arrive over MQTT.
    #[serde(default)]
    pub modbus: Option<RegisterSpec>,
}

fn default_kind() -> ValueKind {
    ValueKind::Number
}

/// A checked profile.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: ProfileName,
    pub description: String,
    pub source: Option<String>,
    pub metrics: Vec<MetricSpec>,
    pub rules: Vec<Rule>,
    /// Checked Modbus registers of the metrics that have them, in file order.
    pub registers: Vec<MetricRegister>,
    /// Modbus defaults of the device type.
    pub modbus: ProfileModbusSpec,
    /// The file the profile was read from, or `None` for a built-in one.
    pub path: Option<PathBuf>,
}

/// A metric and the checked register it is read from.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRegister {
    pub metric: MetricName,
    pub register: Register,
}

impl Profile {
    pub fn metric(&self, name: &MetricName) -> Option<&MetricSpec> {
        self.metrics.iter().find(|m| m.name == *name)
    }

    /// The register a metric is read from, if the profile gives one.
    pub fn register(&self, name: &MetricName) -> Option<&Register> {
        self.registers
            .iter()
            .find(|r| r.metric == *name)
            .map(|r| &r.register)
    }
}

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("{path}: cannot read profile: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The profiles a server knows, by name.
#[derive(Clone, Debug, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<ProfileName, Profile>,
}

impl ProfileSet {
    pub fn get(&self, name: &ProfileName) -> Option<&Profile> {
        self.profiles.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &ProfileName> {
        self.profiles.keys()
    }

    pub fn insert(&mut self, profile: Profile) {
        self.profiles.insert(profile.name.clone(), profile);
    }

    /// Loads every `*.toml` file in `dir`, collecting every problem instead of stopping at
    /// the first.
    pub fn load_dir(dir: &Path) -> Result<ProfileSet, Vec<ProfileError>> {
        let entries = std::fs::read_dir(dir).map_err(|source| {
            vec![ProfileError::Read {
                path: dir.to_owned(),
                source,
            }]
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        paths.sort();

        let mut set = ProfileSet::default();
        let mut errors = Vec::new();
        for path in paths {
            match load_file(&path) {
                Ok(profile) if set.profiles.contains_key(&profile.name) => {
                    errors.push(ProfileError::Invalid {
                        message: format!(
                            "profile name `{}` is already used by another file; give each \
                             profile a unique name",
                            profile.name
                        ),
                        path,
                    });
                }
                Ok(profile) => set.insert(profile),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }
}

/// Loads and checks one profile file.
pub fn load_file(path: &Path) -> Result<Profile, Vec<ProfileError>> {
    let text = crate::files::read_text_limited(path, crate::files::MAX_CONFIG_FILE_BYTES).map_err(
        |source| {
            vec![ProfileError::Read {
                path: path.to_owned(),
                source,
            }]
        },
    )?;
    parse(&text, Some(path))
}

/// Parses and checks profile text; `path` names the file in errors.
pub fn parse(text: &str, path: Option<&Path>) -> Result<Profile, Vec<ProfileError>> {
    let path_buf = path.map_or_else(|| PathBuf::from("<profile>"), Path::to_owned);
    let invalid = |message: String| ProfileError::Invalid {
        path: path_buf.clone(),
        message,
    };

    let spec: ProfileSpec = toml::from_str(text).map_err(|e| vec![invalid(e.to_string())])?;
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for metric in &spec.metrics {
        if !seen.insert(&metric.name) {
            errors.push(invalid(format!(
                "metric `{}` is listed twice; give each metric a unique name",
                metric.name
            )));
        }
        if !is_snake_case(metric.name.as_str()) {
            errors.push(invalid(format!(
                "metric `{}`: names are snake_case (lowercase letters, digits, `_`); rename it",
                metric.name
            )));
        }
    }
    let registers = check_registers(&spec, &mut errors, &invalid);
    errors.extend(check::overlaps(&registers).into_iter().map(&invalid));
    if let Some(max) = spec.modbus.as_ref().and_then(|m| m.max_registers_per_read)
        && !(1..=125).contains(&max)
    {
        errors.push(invalid(format!(
            "[modbus] max_registers_per_read {max} is invalid; write 1 to 125"
        )));
    }
    let mut rules = Vec::new();
    for rule in &spec.rules {
        if !spec.metrics.iter().any(|m| m.name == rule.metric) {
            errors.push(invalid(format!(
                "rule `{}` watches metric `{}`, which the profile does not list; add it to \
                 [[metrics]] or fix the name",
                rule.id, rule.metric
            )));
        }
        match rule.check() {
            Ok(checked) => rules.push(checked),
            Err(problems) => errors.extend(
                problems
                    .into_iter()
                    .map(|(key, msg)| invalid(format!("rule `{}`: {key}: {msg}", rule.id))),
            ),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Profile {
        name: spec.name,
        description: spec.description,
        source: spec.source,
        metrics: spec.metrics,
        rules,
        registers,
        modbus: spec.modbus.unwrap_or_default(),
        path: path.map(Path::to_owned),
    })
}

/// Checks each metric's register description and that its kind matches the register.
fn check_registers(
    spec: &ProfileSpec,
    errors: &mut Vec<ProfileError>,
    invalid: &dyn Fn(String) -> ProfileError,
) -> Vec<MetricRegister> {
    let mut registers = Vec::new();
    for metric in &spec.metrics {
        let Some(register_spec) = &metric.modbus else {
            continue;
        };
        match register_spec.check() {
            Ok(register) => {
                check_kind(metric, &register, errors, invalid);
                registers.push(MetricRegister {
                    metric: metric.name.clone(),
                    register,
                });
            }
            Err(problems) => errors.extend(problems.into_iter().map(|(key, message)| {
                invalid(format!("metric `{}`: modbus.{key}: {message}", metric.name))
            })),
        }
    }
    registers
}

fn check_kind(
    metric: &MetricSpec,
    register: &Register,
    errors: &mut Vec<ProfileError>,
    invalid: &dyn Fn(String) -> ProfileError,
) {
    let expected = if register.is_bool() {
        ValueKind::Bool
    } else {
        ValueKind::Number
    };
    if register.data_type != DataType::String && metric.kind != expected {
        let kind = if expected == ValueKind::Bool {
            "bool"
        } else {
            "number"
        };
        errors.push(invalid(format!(
            "metric `{}`: its register decodes to a {kind}, so write `kind = \"{kind}\"`",
            metric.name
        )));
    }
}

/// Whether `name` is lowercase snake_case, such as `gas_lel`.
pub fn is_snake_case(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
