//! Config reload and device management for a running server.
//!
//! A reload reads the config file again, merges the managed devices
//! ([`crate::config::managed`]) and checks the result like `check-config`. A valid config
//! replaces sites, devices, rules, the offline level, the timestamp window and webhooks.
//! MQTT accounts (device passwords and `[[mqtt_users]]`) change too, unless the broker
//! started open (with no account); live connections of changed accounts are closed
//! ([`crate::ingest::guard`]). Settings that take effect only at start (listeners,
//! storage, TLS, `[mqtt]`, API tokens, CORS, `ingest.max_payload_bytes`) keep their
//! running values and are reported as `restart_required` until a restart. What would stop
//! the next start, such as two listeners on one port, is reported as `start_problems`.
//! An invalid config changes nothing.
//!
//! The alarm stage gets the new rules first, then ingestion gets the new directory, so a
//! reading of a new device never reaches the alarm stage before its rules. Open alarms
//! are never dropped: an alarm of a removed device or rule keeps its state until an
//! operator resets or closes it (docs/alarms.md, "Config changes").

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value as Json, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alarms::manager::{AlarmHandle, WebhookUpdate};
use crate::clock::SharedClock;
use crate::config::managed::{self, ConfigFile, FileProblem};
use crate::config::{Config, ConfigProblem, SharedConfig};
use crate::ingest::auth::MqttAccounts;
use crate::ingest::directory::{Directory, SharedDirectory};
use crate::ingest::guard::GuardPolicy;
use crate::model::DeviceId;
use crate::notify::{DispatcherHandle, NotifyMetrics, Webhook};
use crate::server_modbus::ModbusRunner;

/// Reason a reload or device change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the config has {} problem(s)", .0.len())]
    Invalid(Vec<FileProblem>),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// Changes made by a reload or device change.
#[derive(Clone, Debug, Default)]
pub struct ReloadReport {
    pub devices_added: Vec<DeviceId>,
    pub devices_removed: Vec<DeviceId>,
    pub devices_changed: Vec<DeviceId>,
    pub webhooks_changed: bool,
    /// Keys whose values differ from those the server started with, which are not
    /// applied until the server restarts.
    pub restart_required: Vec<String>,
    /// Problems of the reloaded file that `check-config` reports and that would stop the
    /// next start, such as two listeners on one port or an unusable TLS file. The reload
    /// is applied anyway, because the running values of those settings are kept.
    pub start_problems: Vec<ConfigProblem>,
}

impl ReloadReport {
    pub fn to_json(&self, config: &Config) -> Json {
        json!({
            "sites": config.sites.len(),
            "devices": config.devices.len(),
            "webhooks": config.webhooks.len(),
            "devices_added": self.devices_added,
            "devices_removed": self.devices_removed,
            "devices_changed": self.devices_changed,
            "webhooks_changed": self.webhooks_changed,
            "restart_required": self.restart_required,
            "start_problems": self.start_problems.iter().map(|problem| json!({
                "line": problem.line,
                "key": problem.key,
                "message": problem.message,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The webhook dispatcher of a running server, replaced when the webhooks change.
pub struct WebhookRunner {
    db_path: PathBuf,
    clock: SharedClock,
    metrics: NotifyMetrics,
    /// The server's dispatcher shutdown; the current dispatcher stops with it.
    shutdown: CancellationToken,
    /// Stops the current dispatcher only.
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl WebhookRunner {
    /// Starts the dispatcher for `webhooks`.
    pub fn start(
        db_path: PathBuf,
        webhooks: Vec<Webhook>,
        clock: SharedClock,
        registry: &crate::metrics::SharedRegistry,
        shutdown: CancellationToken,
    ) -> Result<(WebhookRunner, DispatcherHandle), crate::notify::DispatcherError> {
        let mut runner = WebhookRunner {
            db_path,
            clock,
            metrics: registry.register(NotifyMetrics::new),
            stop: shutdown.child_token(),
            shutdown,
            task: None,
        };
        let handle = runner.spawn(webhooks)?;
        Ok((runner, handle))
    }

    fn spawn(
        &mut self,
        webhooks: Vec<Webhook>,
    ) -> Result<DispatcherHandle, crate::notify::DispatcherError> {
        self.stop = self.shutdown.child_token();
        let (handle, task) = crate::notify::spawn_dispatcher_with_metrics(
            &self.db_path,
            webhooks,
            &self.clock,
            &self.metrics,
            &self.stop,
        )?;
        self.task = Some(task);
        Ok(handle)
    }

    /// Stops the dispatcher after its in-flight deliveries and starts one for `webhooks`.
    /// Queued rows stay in the outbox, so the new dispatcher sends them.
    async fn restart(
        &mut self,
        webhooks: Vec<Webhook>,
    ) -> Result<DispatcherHandle, crate::notify::DispatcherError> {
        self.stop().await;
        self.spawn(webhooks)
    }

    /// Stops the dispatcher and waits for its in-flight deliveries.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// State the reloader last applied. It is locked for the whole of a reload or device
/// change, so that they apply one at a time.
struct Applied {
    /// Text of the config file now in use; device changes are checked against it.
    file_text: String,
    managed: Vec<toml::Table>,
    webhooks: WebhookRunner,
    modbus: ModbusRunner,
}

/// Applies config reloads and device changes; see the module docs.
pub struct Reloader {
    file: Option<ConfigFile>,
    config: SharedConfig,
    directory: SharedDirectory,
    /// Taken at shutdown, because the alarm stage ends only when every handle is dropped.
    alarms: std::sync::Mutex<Option<AlarmHandle>>,
    applied: tokio::sync::Mutex<Applied>,
    mqtt: Arc<GuardPolicy>,
    /// The config file's table and the config when the server started, which
    /// `restart_required` compares with.
    started_table: toml::Table,
    started: Arc<Config>,
    /// Digests of the TLS files, by key, when the server started (see [`tls_digests`]).
    started_tls: Vec<(&'static str, Option<[u8; 32]>)>,
}

/// The running parts a [`Reloader`] replaces.
pub struct ReloaderParts {
    pub file: Option<ConfigFile>,
    pub file_text: String,
    pub managed: Vec<toml::Table>,
    pub config: SharedConfig,
    pub directory: SharedDirectory,
    pub alarms: AlarmHandle,
    pub webhooks: WebhookRunner,
    pub modbus: ModbusRunner,
    /// The broker's accounts and login limits, whose device passwords a change replaces.
    pub mqtt: Arc<GuardPolicy>,
}

impl Reloader {
    pub fn new(parts: ReloaderParts) -> Self {
        let started_table = toml::from_str(&parts.file_text).unwrap_or_default();
        let started = parts.config.load();
        let started_tls = tls_digests(&started);
        let applied = Applied {
            file_text: parts.file_text,
            managed: parts.managed,
            webhooks: parts.webhooks,
            modbus: parts.modbus,
        };
        Self {
            file: parts.file,
            config: parts.config,
            directory: parts.directory,
            alarms: std::sync::Mutex::new(Some(parts.alarms)),
            applied: tokio::sync::Mutex::new(applied),
            mqtt: parts.mqtt,
            started_table,
            started,
            started_tls,
        }
    }

    /// Returns the config in use.
    pub fn config(&self) -> Arc<Config> {
        self.config.load()
    }

    fn file(&self) -> Result<&ConfigFile, AdminError> {
        self.file.as_ref().ok_or_else(|| {
            AdminError::Conflict(
                "the server was started without a config file, so there is nothing to reload and no \
                 file to check devices against; start it with --config"
                    .to_owned(),
            )
        })
    }

    /// Reads the config file again and applies it; see the module docs.
    pub async fn reload(&self) -> Result<ReloadReport, AdminError> {
        let file = self.file()?;
        let mut applied = self.applied.lock().await;
        let loaded = managed::load(file).map_err(AdminError::Invalid)?;
        let start_problems = start_problems(file, &loaded.file_text, &loaded.config);
        let mut report = self
            .apply(
                &mut applied,
                loaded.config,
                loaded.file_text,
                loaded.managed,
            )
            .await?;
        tracing::info!(
            file = %file.path.display(),
            added = report.devices_added.len(),
            removed = report.devices_removed.len(),
            changed = report.devices_changed.len(),
            webhooks_changed = report.webhooks_changed,
            restart_required = ?report.restart_required,
            "config reloaded"
        );
        for problem in &start_problems {
            tracing::warn!(
                file = %file.path.display(),
                problem = %problem,
                "the reloaded config is applied, but the next start would fail; fix the file \
                 before restarting"
            );
        }
        report.start_problems = start_problems;
        Ok(report)
    }

    /// Creates or replaces a managed device from its `[[devices]]` fields, stores the managed
    /// devices file, and applies the change. Returns whether the device is new.
    pub async fn put_device(
        &self,
        id: &str,
        mut device: toml::Table,
    ) -> Result<(bool, ReloadReport), AdminError> {
        let file = self.file()?;
        let mut applied = self.applied.lock().await;
        reject_file_device(file, &applied.file_text, id)?;
        device.insert("id".to_owned(), toml::Value::String(id.to_owned()));
        let mut managed = applied.managed.clone();
        let created = match managed
            .iter_mut()
            .find(|d| d.get("id").and_then(toml::Value::as_str) == Some(id))
        {
            Some(existing) => {
                *existing = device;
                false
            }
            None => {
                managed.push(device);
                true
            }
        };
        let report = self.store_managed(file, &mut applied, managed).await?;
        tracing::info!(device = id, created, "managed device stored");
        Ok((created, report))
    }

    /// Deletes a managed device, stores the managed devices file, and applies the change.
    pub async fn delete_device(&self, id: &str) -> Result<ReloadReport, AdminError> {
        let file = self.file()?;
        let mut applied = self.applied.lock().await;
        reject_file_device(file, &applied.file_text, id)?;
        let mut managed = applied.managed.clone();
        let before = managed.len();
        managed.retain(|d| d.get("id").and_then(toml::Value::as_str) != Some(id));
        if managed.len() == before {
            return Err(AdminError::NotFound(format!(
                "device `{id}` is not a managed device; GET /api/v1/devices lists the devices"
            )));
        }
        let report = self.store_managed(file, &mut applied, managed).await?;
        tracing::info!(device = id, "managed device deleted");
        Ok(report)
    }

    /// Checks the running config file's text with `managed`, writes the managed devices
    /// file, then applies the result. Nothing is written or applied when the check fails.
    async fn store_managed(
        &self,
        file: &ConfigFile,
        applied: &mut Applied,
        managed: Vec<toml::Table>,
    ) -> Result<ReloadReport, AdminError> {
        let data_dir = self.config.load().server.data_dir.clone();
        let managed_file = managed::managed_path(&data_dir);
        let file_name = file.path.display().to_string();
        let config = managed::check_with_managed(
            &file_name,
            &applied.file_text,
            &managed,
            &managed_file,
            &file.overrides,
        )
        .map_err(AdminError::Invalid)?;
        self.check_accounts_kept(&config)?;
        managed::write_managed(&managed_file, &managed).map_err(|e| {
            tracing::error!(error = %e, file = %managed_file.display(), "writing the managed devices file failed");
            AdminError::Failed(format!("writing {} failed: {e}; the device was not changed", managed_file.display()))
        })?;
        let file_text = applied.file_text.clone();
        self.apply(applied, config, file_text, managed).await
    }

    /// Rejects a config without MQTT accounts for a broker that started with some,
    /// because the broker would deny every client and the next start would leave it open.
    fn check_accounts_kept(&self, config: &Config) -> Result<(), AdminError> {
        if self.mqtt.accounts.is_open() || !MqttAccounts::from_config(config).is_open() {
            return Ok(());
        }
        Err(AdminError::Conflict(
            "the resulting config has no MQTT account (no device `mqtt_password_hash` and no \
             `[[mqtt_users]]`), so the running broker would deny every client, and a restart \
             would open it to anyone who reaches the port; keep at least one account, or \
             stop the server to run an open broker on loopback"
                .to_owned(),
        ))
    }

    /// Applies a checked config; see the module docs.
    async fn apply(
        &self,
        applied: &mut Applied,
        mut config: Config,
        file_text: String,
        managed: Vec<toml::Table>,
    ) -> Result<ReloadReport, AdminError> {
        let old = self.config.load();
        let old_table: toml::Table = toml::from_str(&applied.file_text).unwrap_or_default();
        let new_table: toml::Table = toml::from_str(&file_text).unwrap_or_default();
        let mut report = diff_devices(&old, &config);
        let mqtt_open = self.mqtt.accounts.is_open();
        self.check_accounts_kept(&config)?;
        report.restart_required = restart_required(
            &self.started_table,
            &new_table,
            &self.started,
            &config,
            mqtt_open,
        );
        // A restart with the same flags and environment keeps their values.
        if let Some(file) = &self.file {
            let overrides = &file.overrides;
            report.restart_required.retain(|key| match key.as_str() {
                "server.http_listen" => overrides.http_listen.is_none(),
                "server.mqtt_listen" => overrides.mqtt_listen.is_none(),
                "server.data_dir" => overrides.data_dir.is_none(),
                _ => true,
            });
        }
        for (key, digest) in tls_digests(&config) {
            let started = self.started_tls.iter().find(|(k, _)| *k == key);
            if started.is_some_and(|(_, before)| *before != digest)
                && !report.restart_required.iter().any(|k| k == key)
            {
                report.restart_required.push(key.to_owned());
            }
        }
        keep_start_settings(&mut config, &old, mqtt_open);
        report.webhooks_changed = old_table.get("webhooks") != new_table.get("webhooks");

        let webhooks = if report.webhooks_changed {
            let dispatcher = applied.webhooks.restart(config.webhooks.clone()).await.map_err(|e| {
                tracing::error!(error = %e, "restarting the webhook dispatcher failed; no webhooks are sent");
                AdminError::Failed(format!("restarting the webhook dispatcher failed: {e}"))
            })?;
            Some(WebhookUpdate {
                webhooks: config.webhooks.clone(),
                dispatcher,
            })
        } else {
            None
        };
        let config = Arc::new(config);
        let alarms = self
            .alarms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let alarms =
            alarms.ok_or_else(|| AdminError::Failed("the server is shutting down".to_owned()))?;
        alarms.reload(config.clone(), webhooks).await.map_err(|e| {
            AdminError::Failed(format!("the alarm stage did not take the new rules: {e}"))
        })?;
        self.directory.store(Directory::from_config(&config));
        self.mqtt
            .replace_accounts(MqttAccounts::from_config(&config));
        self.config.store(config.clone());
        applied.modbus.update(&config).await;
        applied.file_text = file_text;
        applied.managed = managed;
        Ok(report)
    }

    /// Drops the reloader's handle to the alarm stage, at shutdown, so that the stage can
    /// end. Later reloads and device changes fail.
    pub fn release_alarm_stage(&self) {
        self.alarms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }

    /// Stops the Modbus poller, at shutdown.
    pub async fn stop_modbus(&self) {
        self.applied.lock().await.modbus.stop().await;
    }

    /// Stops the webhook dispatcher after its in-flight deliveries, at shutdown.
    pub async fn stop_webhooks(&self) {
        self.applied.lock().await.webhooks.stop().await;
    }
}

/// Returns what `check-config` reports about the start-only settings of a reloaded file
/// and that would stop the next start. Listen addresses are those the server runs with:
/// a problem of an address that a flag or environment variable sets has no line,
/// because the file's line shows another value.
fn start_problems(file: &ConfigFile, text: &str, config: &Config) -> Vec<ConfigProblem> {
    let mut problems = crate::config::check_start(text, Some(config));
    for problem in &mut problems {
        let overridden = match problem.key.as_str() {
            "server.http_listen" if file.overrides.http_listen.is_some() => {
                "--http-listen or STONELION_HTTP_LISTEN"
            }
            "server.mqtt_listen" if file.overrides.mqtt_listen.is_some() => {
                "--mqtt-listen or STONELION_MQTT_LISTEN"
            }
            _ => continue,
        };
        problem.line = 0;
        problem.message = format!(
            "{} (the address comes from {overridden}, which overrides the file)",
            problem.message
        );
    }
    problems.extend(crate::config::unopenable_files(text, config));
    problems.extend(crate::config::file_problems(text, config));
    problems
}

/// Returns the SHA-256 digest of each TLS file that `config` names, by key, or `None` for
/// a file that cannot be read. The server reads these files only at start, so a file
/// replaced since then is listed in `restart_required`.
///
/// NOTE: the start checks read these files again, so a file replaced during a reload can
/// be listed here while `start_problems` judged the old contents, or the reverse.
fn tls_digests(config: &Config) -> Vec<(&'static str, Option<[u8; 32]>)> {
    use sha2::{Digest as _, Sha256};
    crate::config::tls_files(config)
        .into_iter()
        .filter_map(|(key, path)| {
            let path = path.as_deref()?;
            let bytes =
                crate::files::read_limited(path, crate::security::tls::MAX_TLS_FILE_BYTES).ok();
            Some((key, bytes.map(|bytes| Sha256::digest(&bytes).into())))
        })
        .collect()
}

fn reject_file_device(file: &ConfigFile, file_text: &str, id: &str) -> Result<(), AdminError> {
    if managed::file_device_ids(file_text).iter().any(|d| d == id) {
        return Err(AdminError::Conflict(format!(
            "device `{id}` is defined in the config file {}; change it there and reload",
            file.path.display()
        )));
    }
    Ok(())
}

fn diff_devices(old: &Config, new: &Config) -> ReloadReport {
    let mut report = ReloadReport::default();
    for device in &new.devices {
        match old.device(&device.id) {
            None => report.devices_added.push(device.id.clone()),
            // `Debug` redacts the password hash, so it is compared on its own.
            Some(before)
                if format!("{before:?}") != format!("{device:?}")
                    || before.mqtt_password_hash != device.mqtt_password_hash =>
            {
                report.devices_changed.push(device.id.clone());
            }
            Some(_) => {}
        }
    }
    report.devices_removed = old
        .devices
        .iter()
        .filter(|d| new.device(&d.id).is_none())
        .map(|d| d.id.clone())
        .collect();
    report
}

/// Returns the keys whose change takes effect only at start. MQTT accounts (device
/// passwords and `[[mqtt_users]]`) are among them only for a broker that started open
/// (`mqtt_open`).
fn restart_required(
    old_table: &toml::Table,
    new_table: &toml::Table,
    old: &Config,
    new: &Config,
    mqtt_open: bool,
) -> Vec<String> {
    let empty = toml::Table::new();
    let section = |table: &toml::Table, name: &str| -> toml::Table {
        table
            .get(name)
            .and_then(toml::Value::as_table)
            .unwrap_or(&empty)
            .clone()
    };
    let mut keys = Vec::new();
    for name in ["server", "storage", "mqtt", "api"] {
        let (before, after) = (section(old_table, name), section(new_table, name));
        let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        for key in names {
            // Profiles are read again on every reload.
            if name == "server" && key == "profiles_dir" {
                continue;
            }
            if before.get(key) != after.get(key) {
                keys.push(format!("{name}.{key}"));
            }
        }
    }
    if section(old_table, "ingest").get("max_payload_bytes")
        != section(new_table, "ingest").get("max_payload_bytes")
    {
        keys.push("ingest.max_payload_bytes".to_owned());
    }
    if old_table.get("api_tokens") != new_table.get("api_tokens") {
        keys.push("api_tokens".to_owned());
    }
    // An open broker has no authentication handler until a restart.
    if !mqtt_open {
        return keys;
    }
    if old_table.get("mqtt_users") != new_table.get("mqtt_users") {
        keys.push("mqtt_users".to_owned());
    }
    let hash = |config: &Config, id: &DeviceId| {
        config
            .device(id)
            .and_then(|d| d.mqtt_password_hash.as_ref())
            .map(|h| h.as_str().to_owned())
    };
    let ids: BTreeSet<&DeviceId> = old
        .devices
        .iter()
        .chain(&new.devices)
        .map(|d| &d.id)
        .collect();
    for id in ids {
        if hash(old, id) != hash(new, id) {
            keys.push(format!("devices.{id}.mqtt_password_hash"));
        }
    }
    keys
}

/// Keeps the running values of the settings that take effect only at start.
/// `[[mqtt_users]]` change with a reload unless the broker started open.
fn keep_start_settings(config: &mut Config, running: &Config, mqtt_open: bool) {
    let profiles_dir = config.server.profiles_dir.take();
    config.server = running.server.clone();
    config.server.profiles_dir = profiles_dir;
    config.storage = running.storage.clone();
    config.mqtt = running.mqtt.clone();
    if mqtt_open {
        config.mqtt_users = running.mqtt_users.clone();
    }
    config.api = running.api.clone();
    config.api_tokens = running.api_tokens.clone();
    config.ingest.max_payload_bytes = running.ingest.max_payload_bytes;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::builtin::builtin_profiles;

    const HASH_A: &str = "$argon2id$v=19$m=1024,t=1,p=1$c2l4dGVlbiBieXRlIHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn file(sites: &str) -> String {
        format!(
            r#"
[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[sites]]
id = "park-b3"
name = "Building B3"
kind = "park_building"

[[mqtt_users]]
username = "dashboard"
password_hash = "{HASH_A}"
sites = {sites}
"#
        )
    }

    #[test]
    fn overridden_address_problem_has_no_line() {
        // No API token, so an API beyond loopback would be open.
        let text =
            "[server]\nhttp_listen = \"127.0.0.1:8080\"\n".to_owned() + &file("[\"plant-a\"]");
        let file = ConfigFile {
            path: PathBuf::from("stonelion.toml"),
            overrides: crate::config::Overrides {
                http_listen: Some("0.0.0.0:8080".parse().unwrap()),
                ..Default::default()
            },
        };
        let mut config = crate::config::parse(&text, builtin_profiles()).unwrap();
        file.overrides.apply(&mut config.server);
        let problems = start_problems(&file, &text, &config);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "server.http_listen");
        assert_eq!(problems[0].line, 0);
        assert!(
            problems[0].message.ends_with(
                "(the address comes from --http-listen or STONELION_HTTP_LISTEN, which \
                 overrides the file)"
            ),
            "{}",
            problems[0].message
        );

        // Without the flag, the file's own address is fine.
        let config = crate::config::parse(&text, builtin_profiles()).unwrap();
        let file = ConfigFile {
            path: file.path,
            overrides: crate::config::Overrides::default(),
        };
        assert!(start_problems(&file, &text, &config).is_empty());
    }

    #[test]
    fn mqtt_users_reload_unless_broker_started_open() {
        let (old_text, new_text) = (file(r#"["plant-a"]"#), file(r#"["park-b3"]"#));
        let old = crate::config::parse(&old_text, builtin_profiles()).unwrap();
        let new = crate::config::parse(&new_text, builtin_profiles()).unwrap();
        let old_table: toml::Table = toml::from_str(&old_text).unwrap();
        let new_table: toml::Table = toml::from_str(&new_text).unwrap();

        let keys = restart_required(&old_table, &new_table, &old, &new, false);
        assert!(keys.is_empty(), "{keys:?}");
        let mut applied = new.clone();
        keep_start_settings(&mut applied, &old, false);
        assert_eq!(applied.mqtt_users[0].sites, new.mqtt_users[0].sites);

        let keys = restart_required(&old_table, &new_table, &old, &new, true);
        assert_eq!(keys, ["mqtt_users"]);
        let mut applied = new;
        keep_start_settings(&mut applied, &old, true);
        assert_eq!(applied.mqtt_users[0].sites, old.mqtt_users[0].sites);
    }
}
