//! Device profiles: one TOML file per device type in `device-profiles/`, listing its metrics
//! and its default rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::model::{MetricName, ProfileName, ValueKind};
use crate::rules::spec::{Rule, RuleSpec};

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
    /// `number` or `bool`.
    #[serde(default = "default_kind")]
    pub kind: ValueKind,
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
    /// The file the profile was read from, or `None` for a built-in one.
    pub path: Option<PathBuf>,
}

impl Profile {
    pub fn metric(&self, name: &MetricName) -> Option<&MetricSpec> {
        self.metrics.iter().find(|m| m.name == *name)
    }
}

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("{path}: cannot read profile: {source}")]
    Read { path: PathBuf, source: std::io::Error },
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
        let entries = std::fs::read_dir(dir)
            .map_err(|source| vec![ProfileError::Read { path: dir.to_owned(), source }])?;
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
        if errors.is_empty() { Ok(set) } else { Err(errors) }
    }
}

/// Loads and checks one profile file.
pub fn load_file(path: &Path) -> Result<Profile, Vec<ProfileError>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| vec![ProfileError::Read { path: path.to_owned(), source }])?;
    parse(&text, Some(path))
}

/// Parses and checks profile text; `path` names the file in errors.
pub fn parse(text: &str, path: Option<&Path>) -> Result<Profile, Vec<ProfileError>> {
    let path_buf = path.map_or_else(|| PathBuf::from("<profile>"), Path::to_owned);
    let invalid = |message: String| ProfileError::Invalid { path: path_buf.clone(), message };

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
                problems.into_iter().map(|(key, msg)| invalid(format!("rule `{}`: {key}: {msg}", rule.id))),
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
        path: path.map(Path::to_owned),
    })
}
