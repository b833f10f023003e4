//! Devices managed through the HTTP API: kept in `devices.toml` in the data directory, in
//! the `[[devices]]` schema of the config file, and merged with the config file's devices
//! at start, on reload and on every change.
//!
//! The merge appends the managed entries to the config file's text and checks the result
//! with [`super::parse`], so a managed device is checked exactly like one in the file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError, ConfigProblem, Overrides, builtin::builtin_profiles};

/// Name of the managed devices file in the data directory.
pub const MANAGED_DEVICES_FILE: &str = "devices.toml";

/// The config file a server was started with, and the flags that override it.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub overrides: Overrides,
}

/// A config as loaded: the checked config, the config file's text and the managed devices.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: Config,
    pub file_text: String,
    pub managed: Vec<toml::Table>,
}

/// One problem of a loaded config, with the file it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    pub file: String,
    pub problem: ConfigProblem,
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.problem)
    }
}

/// Returns the path of the managed devices file.
pub fn managed_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MANAGED_DEVICES_FILE)
}

/// Reads the config file and the managed devices of its data directory, and checks them
/// together. Relative paths in the config are relative to the current directory.
pub fn load(file: &ConfigFile) -> Result<LoadedConfig, Vec<FileProblem>> {
    let file_name = file.path.display().to_string();
    let file_text =
        crate::files::read_text_limited(&file.path, crate::files::MAX_CONFIG_FILE_BYTES).map_err(
            |e| {
                vec![FileProblem {
                    file: file_name.clone(),
                    problem: ConfigProblem {
                        line: 0,
                        key: String::new(),
                        message: format!("cannot read the config file: {e}; check the path"),
                    },
                }]
            },
        )?;
    // The data directory, and so the managed devices file, comes from the file itself.
    let mut alone = super::parse(&file_text, builtin_profiles())
        .map_err(|problems| in_file(&file_name, problems))?;
    file.overrides.apply(&mut alone.server);
    let managed_file = managed_path(&alone.server.data_dir);
    let managed = read_managed(&managed_file)?;
    let config = check_with_managed(
        &file_name,
        &file_text,
        &managed,
        &managed_file,
        &file.overrides,
    )?;
    Ok(LoadedConfig {
        config,
        file_text,
        managed,
    })
}

/// Checks the config file's text with `managed` devices appended, and applies `overrides`.
/// A problem in an appended entry is reported against `managed_file` with its line there.
pub fn check_with_managed(
    file_name: &str,
    file_text: &str,
    managed: &[toml::Table],
    managed_file: &Path,
    overrides: &Overrides,
) -> Result<Config, Vec<FileProblem>> {
    let managed_text = render_managed(managed).map_err(|message| {
        vec![FileProblem {
            file: managed_file.display().to_string(),
            problem: ConfigProblem {
                line: 0,
                key: "devices".to_owned(),
                message,
            },
        }]
    })?;
    // The appended text starts on a line of its own, after the file's last line.
    let separator = if file_text.ends_with('\n') || file_text.is_empty() {
        "\n"
    } else {
        "\n\n"
    };
    let offset = file_text.matches('\n').count() + separator.len();
    let file_devices = file_device_count(file_text);
    let combined = format!("{file_text}{separator}{managed_text}");
    match super::parse(&combined, builtin_profiles()) {
        Ok(mut config) => {
            overrides.apply(&mut config.server);
            Ok(config)
        }
        Err(problems) => Err(problems
            .into_iter()
            .map(|problem| {
                if problem.line > offset {
                    let line = problem.line - offset;
                    let key = renumber_device_key(&problem.key, file_devices);
                    FileProblem {
                        file: managed_file.display().to_string(),
                        problem: ConfigProblem {
                            line,
                            key,
                            ..problem
                        },
                    }
                } else {
                    FileProblem {
                        file: file_name.to_owned(),
                        problem,
                    }
                }
            })
            .collect()),
    }
}

/// Returns the number of `[[devices]]` entries in the config file's own text.
fn file_device_count(file_text: &str) -> usize {
    toml::from_str::<toml::Table>(file_text)
        .ok()
        .and_then(|table| table.get("devices")?.as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Rewrites `devices[N]...` in a key of the merged list to the entry's index in the
/// managed file, which follows the config file's `file_devices` entries.
fn renumber_device_key(key: &str, file_devices: usize) -> String {
    let Some(rest) = key.strip_prefix("devices[") else {
        return key.to_owned();
    };
    let Some((index, tail)) = rest.split_once(']') else {
        return key.to_owned();
    };
    match index.parse::<usize>() {
        Ok(index) if index >= file_devices => format!("devices[{}]{tail}", index - file_devices),
        _ => key.to_owned(),
    }
}

/// Returns the error of a config that was checked without managed devices.
pub fn in_file(file: &str, problems: Vec<ConfigProblem>) -> Vec<FileProblem> {
    problems
        .into_iter()
        .map(|problem| FileProblem {
            file: file.to_owned(),
            problem,
        })
        .collect()
}

/// Converts problems into the error `stonelion run` prints.
pub fn to_config_error(problems: Vec<FileProblem>) -> ConfigError {
    let source_name = problems.first().map(|p| p.file.clone()).unwrap_or_default();
    ConfigError {
        source_name,
        problems: problems.into_iter().map(|p| p.problem).collect(),
    }
}

/// Reads the `[[devices]]` entries of the managed devices file; a missing file has none.
pub fn read_managed(path: &Path) -> Result<Vec<toml::Table>, Vec<FileProblem>> {
    let problem = |line: usize, message: String| {
        vec![FileProblem {
            file: path.display().to_string(),
            problem: ConfigProblem {
                line,
                key: "devices".to_owned(),
                message,
            },
        }]
    };
    let text = match crate::files::read_text_limited(path, crate::files::MAX_CONFIG_FILE_BYTES) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(problem(
                0,
                format!("cannot read the managed devices file: {e}"),
            ));
        }
    };
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        });
        problem(
            line,
            format!("invalid TOML: {}; fix or remove the file", e.message()),
        )
    })?;
    let extra: Vec<String> = table.keys().filter(|k| *k != "devices").cloned().collect();
    if !extra.is_empty() {
        return Err(problem(
            0,
            format!(
                "unexpected keys {}; the file holds [[devices]] entries only",
                extra.join(", ")
            ),
        ));
    }
    match table.remove("devices") {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(entries)) => entries
            .into_iter()
            .map(|entry| match entry {
                toml::Value::Table(device) => Ok(device),
                _ => Err(problem(
                    0,
                    "each `devices` entry must be a [[devices]] table".to_owned(),
                )),
            })
            .collect(),
        Some(_) => Err(problem(
            0,
            "`devices` must be written as [[devices]] tables".to_owned(),
        )),
    }
}

/// First lines of the managed devices file.
const MANAGED_HEADER: &str = "# Devices managed through the HTTP API (PUT and DELETE /api/v1/devices/{id}).\n\
                              # Written by the server; edit it only while the server is stopped.\n\n";

/// Renders managed devices as the managed devices file's text: a header comment and one
/// `[[devices]]` table each. Lines of this text are lines of the file.
pub fn render_managed(managed: &[toml::Table]) -> Result<String, String> {
    if managed.is_empty() {
        // `devices = []` would clash with the config file's `[[devices]]` tables.
        return Ok(MANAGED_HEADER.to_owned());
    }
    let mut document = toml::Table::new();
    let entries = managed.iter().cloned().map(toml::Value::Table).collect();
    document.insert("devices".to_owned(), toml::Value::Array(entries));
    let body = toml::to_string(&document)
        .map_err(|e| format!("cannot write the managed devices as TOML: {e}"))?;
    Ok(format!("{MANAGED_HEADER}{body}"))
}

/// Writes the managed devices file atomically: a temporary file in the same directory is
/// written and synced, then renamed over the old file, and the directory is synced, so a
/// crash leaves either the old or the new list.
pub fn write_managed(path: &Path, managed: &[toml::Table]) -> std::io::Result<()> {
    let text = render_managed(managed).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("toml.tmp");
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        // Syncing a directory is not supported on every platform; the rename is done either way.
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Returns the device ids of the config file's own `[[devices]]` entries.
pub fn file_device_ids(file_text: &str) -> Vec<String> {
    let Ok(table) = toml::from_str::<toml::Table>(file_text) else {
        return Vec::new();
    };
    let Some(toml::Value::Array(devices)) = table.get("devices") else {
        return Vec::new();
    };
    devices
        .iter()
        .filter_map(|d| d.get("id").and_then(toml::Value::as_str).map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n";

    fn device(id: &str, profile: &str) -> toml::Table {
        let mut table = toml::Table::new();
        table.insert("id".to_owned(), toml::Value::String(id.to_owned()));
        table.insert("site".to_owned(), toml::Value::String("plant-a".to_owned()));
        table.insert(
            "profile".to_owned(),
            toml::Value::String(profile.to_owned()),
        );
        table
    }

    #[test]
    fn managed_devices_merge_with_file() {
        let managed = vec![device("gas-09", "gas-detector")];
        let config = check_with_managed(
            "f.toml",
            FILE,
            &managed,
            Path::new("devices.toml"),
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(config.devices.len(), 1);
        assert_eq!(config.devices[0].id.as_str(), "gas-09");
    }

    #[test]
    fn managed_problem_names_managed_file() {
        let managed = vec![
            device("gas-09", "gas-detector"),
            device("gas-10", "no-such-profile"),
        ];
        let problems = check_with_managed(
            "f.toml",
            FILE,
            &managed,
            Path::new("devices.toml"),
            &Overrides::default(),
        )
        .expect_err("unknown profile");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "devices.toml");
        assert_eq!(problems[0].problem.key, "devices[1].profile");
        // Three header lines, the first entry's four lines and a blank line, then the
        // second entry with its keys in order: id, profile, site.
        assert_eq!(problems[0].problem.line, 11);
    }

    #[test]
    fn managed_problem_uses_managed_index() {
        let file = format!(
            "{FILE}\n[[devices]]\nid = \"gas-01\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n\n\
             [[devices]]\nid = \"gas-02\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n"
        );
        let managed = vec![
            device("gas-09", "gas-detector"),
            device("gas-10", "no-such-profile"),
        ];
        let problems = check_with_managed(
            "f.toml",
            &file,
            &managed,
            Path::new("devices.toml"),
            &Overrides::default(),
        )
        .expect_err("unknown profile");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "devices.toml");
        assert_eq!(problems[0].problem.key, "devices[1].profile");
    }

    #[test]
    fn managed_file_round_trip() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = managed_path(dir.path());
        assert_eq!(
            read_managed(&path).expect("missing file is empty"),
            Vec::new()
        );
        let managed = vec![device("gas-09", "gas-detector")];
        write_managed(&path, &managed).expect("written");
        assert_eq!(read_managed(&path).expect("read back"), managed);
    }
}
