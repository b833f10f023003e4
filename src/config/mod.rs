//! Server configuration: the TOML file as written, and its checked runtime form.
//!
//! Every section rejects unknown keys. Durations are strings with units (`"30s"`, `"5m"`,
//! `"90d"`). Listen addresses and the data directory can be overridden by flags and
//! environment variables; see [`Overrides`].

pub mod builtin;
pub mod check;
pub mod managed;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::modbus::ModbusDeviceConfig;
use crate::model::{DeviceId, ProfileName, SiteId};
use crate::notify::{Webhook, WebhookConfig};
use crate::profile::ProfileSet;
use crate::rules::spec::{Rule, RuleSpec};
use crate::security::config::{ApiSection, MqttSection, MqttUserSpec};
use crate::security::tokens::{ApiTokenSpec, TokenSet};
pub use check::ConfigProblem;
use check::{Checker, EntrySpans};

/// `[server]`: where the server listens and keeps its data.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Directory for time series, alarm state and the webhook queue.
    pub data_dir: PathBuf,
    /// Address of the HTTP API, such as `127.0.0.1:8080`.
    pub http_listen: SocketAddr,
    /// Address of the embedded MQTT broker (MQTT 3.1.1), such as `127.0.0.1:1883`.
    pub mqtt_listen: SocketAddr,
    /// Extra directory of device profiles; its files add to or replace the built-in ones.
    pub profiles_dir: Option<PathBuf>,
    /// Origins, such as `https://grafana.example`, whose browser pages may call the HTTP
    /// API (CORS). Empty, the default, sends no CORS headers.
    pub cors_allowed_origins: Vec<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            profiles_dir: None,
            cors_allowed_origins: Vec::new(),
        }
    }
}

/// `[ingest]`: limits applied to every incoming message.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// Largest MQTT payload accepted, in bytes; larger messages are rejected.
    pub max_payload_bytes: usize,
    /// How far in the future a reading's timestamp may be, to allow for device clock skew.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Maximum age of a reading's timestamp; older readings are rejected, which also
    /// catches devices whose clock was reset to 1970.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Default time without a reading after which a device is marked offline.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for IngestSection {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_future_skew: Duration::from_secs(5 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
            stale_after: Duration::from_secs(5 * 60),
        }
    }
}

/// Backend that stores readings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// The embedded time-series engine in the data directory.
    Embedded,
    /// SQLite in the data directory: slower and larger, kept as a reference.
    Sqlite,
    /// InfluxDB 2 only; `[storage.influxdb2]` is required, and `/query` cannot read it.
    Influxdb2,
    /// The embedded engine and InfluxDB 2 together; queries read the embedded engine.
    Both,
}

/// `[storage]`: the time-series store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// `embedded` (default), `sqlite`, `influxdb2` or `both`.
    pub backend: StorageBackend,
    /// Memory for readings not yet sealed into compressed segments, in bytes; writers
    /// wait when it is full (embedded engine only).
    pub memory_budget_bytes: usize,
    /// Maximum number of series in the embedded engine's index, which is kept in memory
    /// (about 1.7 KB per series, see `docs/storage.md`); 0 means no limit. Points that would create more series are
    /// rejected, and points of existing series are still stored.
    pub max_series: usize,
    /// InfluxDB 2 connection, for the `influxdb2` and `both` backends.
    pub influxdb2: Option<crate::storage::influxdb2::InfluxDb2Config>,
    /// How long raw readings are kept; older partitions are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Downsampling tiers (`[[storage.rollups]]`), finest first (embedded engine only).
    pub rollups: Vec<crate::storage::engine::RollupTier>,
    /// Maximum time between accepting a reading and its reaching the disk. Writes are
    /// committed in groups at this interval.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How often each site's summary (devices online, open alarms) is written to the
    /// store, as the measurement `site_summary` that the overview dashboard reads.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Embedded,
            memory_budget_bytes: 512 << 20,
            max_series: crate::storage::engine::DEFAULT_MAX_SERIES,
            influxdb2: None,
            retention: Duration::from_secs(365 * 24 * 3600),
            rollups: Vec::new(),
            commit_interval: Duration::from_millis(500),
            summary_interval: Duration::from_secs(10),
        }
    }
}

/// `[alarms]`: settings shared by every alarm.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// Level (1 or 2) of the alarm raised when a device goes offline.
    pub offline_level: u8,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        Self { offline_level: 1 }
    }
}

/// Kind of a monitored site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// A key enterprise's plant.
    Enterprise,
    /// A building in an industrial or city park.
    ParkBuilding,
}

impl SiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Enterprise => "enterprise",
            SiteKind::ParkBuilding => "park_building",
        }
    }
}

/// `[[sites]]`: a monitored site.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Site id, used in MQTT topics (`telemetry/{site}/{device}`) and the API.
    pub id: SiteId,
    /// Name shown to operators.
    pub name: String,
    /// `enterprise` or `park_building`.
    pub kind: SiteKind,
}

/// `[[devices]]`: a field device as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Device id, unique across all sites.
    pub id: DeviceId,
    /// Id of the site the device belongs to.
    pub site: SiteId,
    /// Name of the device profile that describes its metrics and default rules.
    pub profile: ProfileName,
    /// Name shown to operators; defaults to the id.
    #[serde(default)]
    pub name: Option<String>,
    /// Time without a reading after which the device is marked offline; defaults to
    /// `[ingest] stale_after`.
    #[serde(default, with = "humantime_serde")]
    pub stale_after: Option<Duration>,
    /// Rules for this device; a rule with the id of a profile rule replaces it.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// How to poll the device over Modbus; absent for devices that publish over MQTT.
    /// See docs/modbus.md.
    #[serde(default)]
    pub modbus: Option<ModbusDeviceConfig>,
    /// argon2 PHC string (from `stonelion hash-password`) of the password the device sends
    /// over MQTT, with its id as username. Devices without one cannot log in once any
    /// MQTT account is configured.
    #[serde(default)]
    pub mqtt_password_hash: Option<crate::security::PhcString>,
}

/// A checked device.
#[derive(Clone, Debug)]
pub struct Device {
    pub id: DeviceId,
    pub site: SiteId,
    pub profile: ProfileName,
    pub name: String,
    pub stale_after: Duration,
    /// Effective rules: the profile's defaults with this device's overrides applied.
    pub rules: Vec<Rule>,
    pub modbus: Option<ModbusDeviceConfig>,
    /// Checked argon2 PHC string of the device's MQTT password.
    pub mqtt_password_hash: Option<crate::security::PhcString>,
}

/// The checked configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerSection,
    pub ingest: IngestSection,
    pub storage: StorageSection,
    pub alarms: AlarmsSection,
    pub sites: Vec<Site>,
    pub devices: Vec<Device>,
    pub webhooks: Vec<Webhook>,
    pub profiles: ProfileSet,
    pub mqtt: MqttSection,
    pub mqtt_users: Vec<MqttUserSpec>,
    pub api: ApiSection,
    pub api_tokens: TokenSet,
}

impl Config {
    pub fn site(&self, id: &SiteId) -> Option<&Site> {
        self.sites.iter().find(|s| s.id == *id)
    }

    pub fn device(&self, id: &DeviceId) -> Option<&Device> {
        self.devices.iter().find(|d| d.id == *id)
    }
}

/// The config in use, shared by the API and the reload task.
///
/// A reload replaces the whole config at once; readers take the current one with
/// [`SharedConfig::load`] and use it for the whole request.
#[derive(Clone, Debug)]
pub struct SharedConfig(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>);

impl SharedConfig {
    pub fn new(config: std::sync::Arc<Config>) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(config)))
    }

    /// Returns the current config.
    pub fn load(&self) -> std::sync::Arc<Config> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the config; readers holding the previous one finish with it.
    pub fn store(&self, config: std::sync::Arc<Config>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }
}

/// Values from flags and environment variables that replace the file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub http_listen: Option<SocketAddr>,
    pub mqtt_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

impl Overrides {
    pub fn apply(&self, server: &mut ServerSection) {
        if let Some(addr) = self.http_listen {
            server.http_listen = addr;
        }
        if let Some(addr) = self.mqtt_listen {
            server.mqtt_listen = addr;
        }
        if let Some(dir) = &self.data_dir {
            server.data_dir.clone_from(dir);
        }
    }
}

/// The config error: every problem found, in file order.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {} problem(s):\n{}", problems.len(), render(problems))]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

fn render(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and checks a config file. Relative paths in it are relative to the current
/// directory.
pub fn load_file(path: &Path, builtin: ProfileSet) -> Result<Config, ConfigError> {
    let text = crate::files::read_text_limited(path, crate::files::MAX_CONFIG_FILE_BYTES).map_err(
        |e| ConfigError {
            source_name: path.display().to_string(),
            problems: vec![ConfigProblem {
                line: 0,
                key: String::new(),
                message: format!("cannot read the config file: {e}; check the path"),
            }],
        },
    )?;
    parse(&text, builtin).map_err(|problems| ConfigError {
        source_name: path.display().to_string(),
        problems,
    })
}

/// Parses and checks config text against the built-in profiles plus `profiles_dir`.
pub fn parse(text: &str, builtin: ProfileSet) -> Result<Config, Vec<ConfigProblem>> {
    let document = check::parse_document(text).map_err(|p| vec![p])?;
    let mut checker = Checker::new(text);
    checker.index_document(&document);
    let mut raw = RawSections::default();

    for (key, value) in document.get_ref() {
        let name: &str = key.get_ref();
        match name {
            "server" => raw.server = checker.deserialize(name, value),
            "ingest" => raw.ingest = checker.deserialize(name, value),
            "storage" => raw.storage = checker.deserialize(name, value),
            "alarms" => raw.alarms = checker.deserialize(name, value),
            "sites" => raw.sites = checker.deserialize_array(name, value),
            "devices" => raw.devices = checker.deserialize_array(name, value),
            "webhooks" => raw.webhooks = checker.deserialize_array(name, value),
            "mqtt" => raw.mqtt = checker.deserialize(name, value),
            "mqtt_users" => raw.mqtt_users = checker.deserialize_array(name, value),
            "api" => raw.api = checker.deserialize(name, value),
            "api_tokens" => raw.api_tokens = checker.deserialize_array(name, value),
            other => checker.push(
                Some(key.span()),
                other,
                format!(
                    "unknown section `{other}`; expected one of server, ingest, storage, \
                     alarms, sites, devices, webhooks, mqtt, mqtt_users, api, api_tokens"
                ),
            ),
        }
    }
    let config = raw.check(&mut checker, builtin);
    if checker.problems.is_empty() {
        Ok(config)
    } else {
        checker.problems.sort_by_key(|p| p.line);
        Err(checker.problems)
    }
}

/// Checks what `stonelion run` rejects after the config parses and before it opens
/// anything: a listener beyond loopback that accepts anyone, or two listeners on one
/// port. `text` is the config text, used for line numbers, and `config` the config
/// checked from it.
///
/// Without `config`, because the text has other problems, the check reads the listen
/// addresses as written, with defaults for absent or invalid ones. It counts credentials
/// as configured when any `[[api_tokens]]`, `[[mqtt_users]]` or device
/// `mqtt_password_hash` entry is written, so that an invalid entry does not also raise an
/// open-listener problem. Flags and environment variables that override the listen
/// addresses are not applied.
pub fn check_start(text: &str, config: Option<&Config>) -> Vec<ConfigProblem> {
    let Ok(document) = check::parse_document(text) else {
        return Vec::new();
    };
    let listeners = match config {
        Some(config) => {
            let mqtt_open = crate::ingest::auth::MqttAccounts::from_config(config).is_open();
            crate::security::Listeners::of(config, mqtt_open)
        }
        None => listeners_as_written(text, &document),
    };
    let mut checker = Checker::new(text);
    checker.index_document(&document);
    for (key, error) in listeners.problems() {
        // Two listeners on one port are reported on a key that the file sets, when one
        // of them keeps its default.
        let key = match &error {
            crate::security::ListenerError::SharedPort(shared)
                if !checker.is_written(shared.second.key) =>
            {
                shared.first.key
            }
            _ => key,
        };
        checker.push(None, key, error.to_string());
    }
    checker.problems
}

/// Returns a warning for each file named in `config` that cannot be opened now, such as a
/// TLS certificate. `run` fails to start unless the file can be opened by then, but it
/// may be installed after the check, so these are warnings and not problems. A server
/// certificate that is not valid now, or that expires within 30 days, is a warning too.
pub fn file_warnings(text: &str, config: &Config) -> Vec<ConfigProblem> {
    let mut checker = Checker::new(text);
    if let Ok(document) = check::parse_document(text) {
        checker.index_document(&document);
    }
    for (key, path) in tls_files(config) {
        let Some(path) = path else { continue };
        if key.ends_with(".tls_cert")
            && let Some(validity) = crate::security::tls::ChainValidity::of_file(path)
            && let Some(warning) = validity.warning(path, chrono::Utc::now())
        {
            checker.push(None, key, warning);
        }
        if let Some(warning) = open_warning(path) {
            checker.push(None, key, warning);
        }
    }
    checker.problems
}

/// Returns a problem for each TLS file named in `config` that cannot be opened now. For a
/// running server these stop the next start; [`file_warnings`] lists them as warnings.
pub fn unopenable_files(text: &str, config: &Config) -> Vec<ConfigProblem> {
    let mut checker = Checker::new(text);
    if let Ok(document) = check::parse_document(text) {
        checker.index_document(&document);
    }
    for (key, path) in tls_files(config) {
        if let Some(problem) = path.as_deref().and_then(open_warning) {
            checker.push(None, key, problem);
        }
    }
    checker.problems
}

/// Describes why `path` cannot be opened now, if it cannot.
fn open_warning(path: &Path) -> Option<String> {
    let e = open_check(path).err()?;
    let fix = match e.kind() {
        std::io::ErrorKind::NotFound => "`run` fails to start unless the file exists then",
        std::io::ErrorKind::PermissionDenied => {
            "`run` fails to start unless the user that runs Stonelion can read it"
        }
        _ => "`run` fails to start unless the path names a readable file then",
    };
    Some(format!("cannot open {}: {e}; {fix}", path.display()))
}

/// Returns a problem for each TLS file that can be opened now but that `run` could not
/// use: a certificate chain or key that is not PEM, a key that does not fit its
/// certificate, or a client CA file with no valid certificate. A file that cannot be
/// opened is left to [`file_warnings`], because it may be installed after the check.
pub fn file_problems(text: &str, config: &Config) -> Vec<ConfigProblem> {
    use crate::security::tls::{
        PairFile, check_certificate_file, check_client_ca, check_key_file, check_server_files,
    };

    let mut checker = Checker::new(text);
    if let Ok(document) = check::parse_document(text) {
        checker.index_document(&document);
    }
    let sections = [
        (
            "api",
            &config.api.tls_cert,
            &config.api.tls_key,
            &config.api.tls_client_ca,
        ),
        (
            "mqtt",
            &config.mqtt.tls_cert,
            &config.mqtt.tls_key,
            &config.mqtt.tls_client_ca,
        ),
    ];
    for (section, cert, key, client_ca) in sections {
        let (cert, key) = (opens(cert), opens(key));
        let mut problems = Vec::new();
        if let Some(Err(e)) = cert.map(check_certificate_file) {
            problems.push(("tls_cert", e));
        }
        if let Some(Err(e)) = key.map(check_key_file) {
            problems.push(("tls_key", e));
        }
        if let (Some(cert), Some(key), true) = (cert, key, problems.is_empty())
            && let Err((file, e)) = check_server_files(cert, key)
        {
            let name = match file {
                PairFile::Certificate => "tls_cert",
                PairFile::Key => "tls_key",
            };
            problems.push((name, e));
        }
        for (name, e) in problems {
            checker.push(None, format!("{section}.{name}"), e.to_string());
        }
        if let Some(path) = opens(client_ca)
            && let Err(e) = check_client_ca(path)
        {
            checker.push(None, format!("{section}.tls_client_ca"), e.to_string());
        }
    }
    checker.problems
}

/// Returns `path` when it exists and, for a regular file, can be opened now. Something
/// that is not a regular file, such as a FIFO, is returned too, so that the file checks
/// report it.
fn opens(path: &Option<PathBuf>) -> Option<&Path> {
    path.as_deref().filter(|path| open_check(path).is_ok())
}

/// Checks that `path` exists and, when it is a regular file, that it can be opened.
/// Something else, such as a FIFO or a device, is not opened: the file checks reject it.
fn open_check(path: &Path) -> std::io::Result<()> {
    if std::fs::metadata(path)?.is_file() {
        crate::files::open_without_blocking(path)?;
    }
    Ok(())
}

/// Returns the TLS files of `config`, by key.
pub fn tls_files(config: &Config) -> [(&'static str, &Option<PathBuf>); 6] {
    [
        ("api.tls_cert", &config.api.tls_cert),
        ("api.tls_key", &config.api.tls_key),
        ("api.tls_client_ca", &config.api.tls_client_ca),
        ("mqtt.tls_cert", &config.mqtt.tls_cert),
        ("mqtt.tls_key", &config.mqtt.tls_key),
        ("mqtt.tls_client_ca", &config.mqtt.tls_client_ca),
    ]
}

/// Reads the listeners of a config document that has problems; see [`check_start`].
fn listeners_as_written(
    text: &str,
    document: &toml::Spanned<toml::de::DeTable<'_>>,
) -> crate::security::Listeners {
    // Problems are already reported by `parse`, so this checker's are dropped.
    let mut scratch = Checker::new(text);
    let table = document.get_ref();
    let server: ServerSection = table
        .get("server")
        .and_then(|value| scratch.deserialize("server", value))
        .unwrap_or_default();
    let mqtt: MqttSection = table
        .get("mqtt")
        .and_then(|value| scratch.deserialize("mqtt", value))
        .unwrap_or_default();
    let entries = |name: &str| -> Vec<&toml::de::DeValue<'_>> {
        table
            .get(name)
            .and_then(|value| value.get_ref().as_array())
            .map(|array| array.iter().map(|entry| entry.get_ref()).collect())
            .unwrap_or_default()
    };
    let device_has_password = entries("devices").iter().any(|device| {
        device
            .as_table()
            .is_some_and(|device| device.get("mqtt_password_hash").is_some())
    });
    crate::security::Listeners {
        http_listen: server.http_listen,
        mqtt_listen: server.mqtt_listen,
        mqtt_tls_listen: mqtt.tls_listen,
        ipv6_only: crate::security::ipv6_only(),
        api_open: entries("api_tokens").is_empty(),
        mqtt_open: entries("mqtt_users").is_empty() && !device_has_password,
    }
}

/// Sections as deserialized, before cross-checks.
#[derive(Default)]
struct RawSections {
    server: Option<ServerSection>,
    ingest: Option<IngestSection>,
    storage: Option<StorageSection>,
    alarms: Option<AlarmsSection>,
    sites: Vec<(Site, EntrySpans)>,
    devices: Vec<(DeviceSpec, EntrySpans)>,
    webhooks: Vec<(WebhookConfig, EntrySpans)>,
    mqtt: Option<MqttSection>,
    mqtt_users: Vec<(MqttUserSpec, EntrySpans)>,
    api: Option<ApiSection>,
    api_tokens: Vec<(ApiTokenSpec, EntrySpans)>,
}

impl RawSections {
    fn check(self, checker: &mut Checker<'_>, builtin: ProfileSet) -> Config {
        let server = self.server.unwrap_or_default();
        check_cors_origins(checker, &server.cors_allowed_origins);
        let ingest = self.ingest.unwrap_or_default();
        check_ingest(checker, &ingest);
        let alarms = self.alarms.unwrap_or_default();
        if !(1..=2).contains(&alarms.offline_level) {
            checker.push(
                None,
                "alarms.offline_level",
                format!("level {} is invalid; write 1 or 2", alarms.offline_level),
            );
        }
        let storage = self.storage.unwrap_or_default();
        check_storage(checker, &storage);
        let profiles = load_profiles(checker, builtin, server.profiles_dir.as_deref());
        let sites = check_sites(checker, self.sites);
        let devices = check_devices(checker, self.devices, &sites, &profiles, &ingest);
        let webhooks = check_webhooks(checker, self.webhooks);
        let mqtt = self.mqtt.unwrap_or_default();
        crate::security::config::check_mqtt(checker, &mqtt);
        let mqtt_users =
            crate::security::config::check_mqtt_users(checker, self.mqtt_users, &sites, &devices);
        let api = self.api.unwrap_or_default();
        crate::security::config::check_api(checker, &api);
        let api_tokens = crate::security::config::check_api_tokens(checker, self.api_tokens);
        Config {
            server,
            ingest,
            storage,
            alarms,
            sites,
            devices,
            webhooks,
            profiles,
            mqtt,
            mqtt_users,
            api,
            api_tokens,
        }
    }
}

fn check_ingest(checker: &mut Checker<'_>, ingest: &IngestSection) {
    if ingest.max_payload_bytes < 64 {
        checker.push(
            None,
            "ingest.max_payload_bytes",
            "write at least 64 bytes, such as 65536",
        );
    }
    for (key, value) in [
        ("ingest.max_age", ingest.max_age),
        ("ingest.stale_after", ingest.stale_after),
    ] {
        if value.is_zero() {
            checker.push(
                None,
                key,
                "a zero duration would reject or expire every reading; write one such as \"5m\"",
            );
        }
    }
}

fn check_cors_origins(checker: &mut Checker<'_>, origins: &[String]) {
    for (index, origin) in origins.iter().enumerate() {
        if let Err(message) = check_origin(origin) {
            checker.push(
                None,
                format!("server.cors_allowed_origins[{index}]"),
                message,
            );
        }
    }
}

/// Checks that `origin` is a browser origin as sent in the `Origin` header: a scheme and a
/// host with an optional port, without path or trailing slash.
pub fn check_origin(origin: &str) -> Result<(), String> {
    let fix = "write an origin such as \"https://grafana.example\" or \"http://10.0.0.5:3000\"";
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Err(format!("`{origin}` is not an origin; {fix}"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "`{origin}` has scheme `{scheme}`; browsers send http or https origins; {fix}"
        ));
    }
    let valid_authority = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !valid_authority {
        return Err(format!(
            "`{origin}` has a path, wildcard or invalid host; {fix}"
        ));
    }
    Ok(())
}

fn check_storage(checker: &mut Checker<'_>, storage: &StorageSection) {
    if storage.retention < Duration::from_secs(3600) {
        checker.push(
            None,
            "storage.retention",
            "retention below 1h would delete fresh readings; write one such as \"90d\"",
        );
    }
    let needs_influx = matches!(
        storage.backend,
        StorageBackend::Influxdb2 | StorageBackend::Both
    );
    match (&storage.influxdb2, needs_influx) {
        (None, true) => checker.push(
            None,
            "storage.influxdb2",
            "the influxdb2 and both backends need a [storage.influxdb2] section with url, org, bucket and token (or token_env)",
        ),
        (Some(influx), true) => {
            if let Err(e) = influx.validate() {
                checker.push(None, "storage.influxdb2", e.to_string());
            }
        }
        _ => {}
    }
    if storage.commit_interval.is_zero() || storage.commit_interval > Duration::from_secs(60) {
        checker.push(
            None,
            "storage.commit_interval",
            "write a duration between 1ms and 60s, such as \"500ms\"",
        );
    }
    if storage.summary_interval < Duration::from_secs(1)
        || storage.summary_interval > Duration::from_secs(300)
    {
        checker.push(
            None,
            "storage.summary_interval",
            "write a duration between 1s and 5m, such as \"10s\"",
        );
    }
    if storage.memory_budget_bytes < 16 << 20 {
        checker.push(
            None,
            "storage.memory_budget_bytes",
            "write at least 16777216 (16 MiB)",
        );
    }
    // Series ids are 32-bit, so a larger limit could never be reached.
    if storage.max_series >= u32::MAX as usize {
        checker.push(
            None,
            "storage.max_series",
            format!(
                "{} is above the engine's maximum of {} series; write a smaller number, or 0 for no limit",
                storage.max_series,
                u32::MAX - 1
            ),
        );
    }
    check_rollups(checker, storage);
}

/// Checks `[[storage.rollups]]`: each resolution divides the 1-day partition and is a
/// larger multiple of the tier before it, and each retention covers the raw retention.
/// Formats a duration as a config value: whole days as `"365d"` and whole hours as
/// `"36h"`, because humantime would print 365 days as months and days.
fn show_duration(duration: Duration) -> String {
    const DAY: u64 = 86_400;
    let secs = duration.as_secs();
    if duration.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(DAY) {
        format!("{}d", secs / DAY)
    } else if duration.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(3_600) {
        format!("{}h", secs / 3_600)
    } else {
        humantime::format_duration(duration).to_string()
    }
}

fn check_rollups(checker: &mut Checker<'_>, storage: &StorageSection) {
    const PARTITION: Duration = Duration::from_secs(86_400);
    if !storage.rollups.is_empty()
        && matches!(
            storage.backend,
            StorageBackend::Sqlite | StorageBackend::Influxdb2
        )
    {
        checker.push(
            None,
            "storage.rollups",
            "rollups need the embedded engine; set storage.backend to \"embedded\" or \"both\", or remove [[storage.rollups]]",
        );
    }
    let show = show_duration;
    let mut previous: Option<Duration> = None;
    for (index, tier) in storage.rollups.iter().enumerate() {
        let resolution = tier.resolution;
        let key = format!("storage.rollups[{index}].resolution");
        if resolution < Duration::from_secs(1)
            || !PARTITION.as_nanos().is_multiple_of(resolution.as_nanos())
        {
            checker.push(
                None,
                key,
                format!(
                    "resolution {} must be at least 1s and divide 1d, the partition width; write one such as \"1m\", \"5m\" or \"1h\"",
                    show(resolution)
                ),
            );
        } else if let Some(previous) = previous
            && resolution <= previous
        {
            checker.push(
                None,
                key,
                format!(
                    "resolution {} is not coarser than the tier before it ({}); list tiers finest first and make each resolution a larger multiple of the previous one, such as \"1m\" then \"1h\"",
                    show(resolution),
                    show(previous)
                ),
            );
        } else if let Some(previous) = previous
            && !resolution.as_nanos().is_multiple_of(previous.as_nanos())
        {
            checker.push(
                None,
                key,
                format!(
                    "resolution {} is not a multiple of the tier before it ({}); list tiers finest first and make each resolution a larger multiple of the previous one, such as \"{}\"",
                    show(resolution),
                    show(previous),
                    show(previous * 5)
                ),
            );
        }
        previous = Some(resolution);
        if tier.retention < storage.retention {
            checker.push(
                None,
                format!("storage.rollups[{index}].retention"),
                format!(
                    "retention {} is shorter than storage.retention ({}), so rollups would be deleted before the raw data they replace; write at least \"{}\"",
                    show(tier.retention),
                    show(storage.retention),
                    show(storage.retention)
                ),
            );
        }
    }
}

fn load_profiles(checker: &mut Checker<'_>, builtin: ProfileSet, dir: Option<&Path>) -> ProfileSet {
    let Some(dir) = dir else { return builtin };
    match ProfileSet::load_dir(dir) {
        Ok(extra) => {
            let mut all = builtin;
            for name in extra.names().cloned().collect::<Vec<_>>() {
                if let Some(profile) = extra.get(&name) {
                    all.insert(profile.clone());
                }
            }
            all
        }
        Err(errors) => {
            for error in errors {
                checker.push(None, "server.profiles_dir", error.to_string());
            }
            builtin
        }
    }
}

fn check_sites(checker: &mut Checker<'_>, entries: Vec<(Site, EntrySpans)>) -> Vec<Site> {
    let mut seen = HashSet::new();
    let mut sites = Vec::new();
    for (site, spans) in entries {
        let index = spans.index;
        if let Err(message) = check_id(site.id.as_str()) {
            checker.push(Some(spans.key("id")), format!("sites[{index}].id"), message);
        } else if !seen.insert(site.id.clone()) {
            checker.push(
                Some(spans.key("id")),
                format!("sites[{index}].id"),
                format!(
                    "site id `{}` is used twice; give each site a unique id",
                    site.id
                ),
            );
        } else {
            sites.push(site);
        }
    }
    sites
}

fn check_devices(
    checker: &mut Checker<'_>,
    entries: Vec<(DeviceSpec, EntrySpans)>,
    sites: &[Site],
    profiles: &ProfileSet,
    ingest: &IngestSection,
) -> Vec<Device> {
    let mut seen = HashSet::new();
    let mut devices = Vec::new();
    for (spec, spans) in entries {
        let index = spans.index;
        let key = |field: &str| format!("devices[{index}].{field}");
        let mut ok = true;
        if let Err(message) = check_id(spec.id.as_str()) {
            checker.push(Some(spans.key("id")), key("id"), message);
            ok = false;
        } else if !seen.insert(spec.id.clone()) {
            checker.push(
                Some(spans.key("id")),
                key("id"),
                format!(
                    "device id `{}` is used twice; device ids must be unique across sites",
                    spec.id
                ),
            );
            ok = false;
        }
        if spec.stale_after.is_some_and(|d| d < Duration::from_secs(1)) {
            // Below a second every reading would be followed by an offline alarm.
            checker.push(
                Some(spans.key("stale_after")),
                key("stale_after"),
                "write at least 1s, and longer than the device's reporting interval, such as \"5m\"",
            );
            ok = false;
        }
        if !sites.iter().any(|s| s.id == spec.site) && checker.is_written_site(spec.site.as_str()) {
            // The site's entry is invalid and reported on its own.
            ok = false;
        } else if !sites.iter().any(|s| s.id == spec.site) {
            let known: Vec<&str> = sites.iter().map(|s| s.id.as_str()).collect();
            let hint = if known.is_empty() {
                "no sites are declared yet".to_owned()
            } else {
                format!("declared sites: {}", known.join(", "))
            };
            checker.push(
                Some(spans.key("site")),
                key("site"),
                format!(
                    "unknown site `{}`; declare it in [[sites]] ({hint})",
                    spec.site
                ),
            );
            ok = false;
        }
        let Some(profile) = profiles.get(&spec.profile) else {
            let known: Vec<&str> = profiles.names().map(ProfileName::as_str).collect();
            checker.push(
                Some(spans.key("profile")),
                key("profile"),
                format!(
                    "unknown profile `{}`; use one of: {}",
                    spec.profile,
                    known.join(", ")
                ),
            );
            continue;
        };
        let mut rules: BTreeMap<_, Rule> = profile
            .rules
            .iter()
            .map(|r| (r.id.clone(), r.clone()))
            .collect();
        let mut rule_ids = HashSet::new();
        for (rule_index, rule) in spec.rules.iter().enumerate() {
            let rule_key = format!("devices[{index}].rules[{rule_index}]");
            let rule_span = |field: &str| Some(spans.key(&format!("rules[{rule_index}].{field}")));
            if !rule_ids.insert(rule.id.clone()) {
                checker.push(
                    rule_span("id"),
                    format!("{rule_key}.id"),
                    format!(
                        "rule id `{}` is used twice for this device; give each rule a unique id",
                        rule.id
                    ),
                );
                ok = false;
            }
            if let Some(metric) = profile.metric(&rule.metric) {
                let wants_bool = rule.kind == crate::rules::spec::RuleKind::Equals;
                if wants_bool != (metric.kind == crate::model::ValueKind::Bool) {
                    let (rule_kind, metric_kind) = if wants_bool {
                        ("an equals", "a number")
                    } else {
                        ("a threshold", "a boolean")
                    };
                    checker.push(
                        rule_span("kind"),
                        format!("{rule_key}.kind"),
                        format!(
                            "{rule_kind} rule cannot watch `{}`, which is {metric_kind}; use kind = {}",
                            rule.metric,
                            if wants_bool { "\"above\" or \"below\"" } else { "\"equals\"" }
                        ),
                    );
                    ok = false;
                }
            }
            if profile.metric(&rule.metric).is_none() {
                checker.push(
                    rule_span("metric"),
                    format!("{rule_key}.metric"),
                    format!(
                        "profile `{}` has no metric `{}`; use one of: {}",
                        profile.name,
                        rule.metric,
                        profile
                            .metrics
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                ok = false;
            }
            match rule.check() {
                Ok(checked) => {
                    rules.insert(checked.id.clone(), checked);
                }
                Err(problems) => {
                    ok = false;
                    for (field, message) in problems {
                        checker.push(rule_span(field), format!("{rule_key}.{field}"), message);
                    }
                }
            }
        }
        if let Some(modbus) = &spec.modbus {
            for (field, message) in modbus.validate() {
                checker.push(
                    Some(spans.key("modbus")),
                    format!("devices[{index}].modbus.{field}"),
                    message,
                );
                ok = false;
            }
            if let Some(message) = check_polled_staleness(
                modbus,
                profile,
                spec.stale_after.unwrap_or(ingest.stale_after),
            ) {
                let span = if spec.stale_after.is_some() {
                    spans.key("stale_after")
                } else {
                    spans.key("modbus")
                };
                checker.push(Some(span), key("stale_after"), message);
                ok = false;
            }
            if profile.registers.is_empty() {
                checker.push(
                    Some(spans.key("modbus")),
                    key("modbus"),
                    format!(
                        "profile `{}` describes no Modbus registers, so the device cannot be polled; \
                         use a profile with registers or remove [devices.modbus]",
                        profile.name
                    ),
                );
                ok = false;
            }
        }
        let hash_check = spec
            .mqtt_password_hash
            .as_ref()
            .map(|hash| crate::security::check_password_hash(hash.as_str()));
        if let Some(Err(message)) = hash_check {
            checker.push(
                Some(spans.key("mqtt_password_hash")),
                key("mqtt_password_hash"),
                message,
            );
            ok = false;
        }
        if ok {
            devices.push(Device {
                name: spec.name.unwrap_or_else(|| spec.id.to_string()),
                stale_after: spec.stale_after.unwrap_or(ingest.stale_after),
                id: spec.id,
                site: spec.site,
                profile: spec.profile,
                rules: rules.into_values().collect(),
                modbus: spec.modbus,
                mqtt_password_hash: spec.mqtt_password_hash,
            });
        }
    }
    devices
}

/// Checks that a polled device's staleness timeout leaves the poller time to decide.
///
/// The pipeline marks any device offline when no reading arrives within `stale_after`,
/// polled devices included. A timeout that is not longer than `offline_after_failures`
/// poll intervals would raise an offline alarm for a device that misses one poll, or for
/// every device whose interval is longer than the timeout.
fn check_polled_staleness(
    modbus: &ModbusDeviceConfig,
    profile: &crate::profile::Profile,
    stale_after: Duration,
) -> Option<String> {
    let interval = modbus
        .poll_interval
        .or(profile.modbus.poll_interval)
        .unwrap_or(crate::modbus::config::DEFAULT_POLL_INTERVAL);
    let needed = interval.saturating_mul(modbus.offline_after_failures.max(1));
    (stale_after <= needed).then(|| {
        format!(
            "stale_after {} is not longer than poll_interval {} x offline_after_failures {} = {}, \
             so a device that misses a poll would be marked offline; raise stale_after above {}",
            humantime::format_duration(stale_after),
            humantime::format_duration(interval),
            modbus.offline_after_failures,
            humantime::format_duration(needed),
            humantime::format_duration(needed),
        )
    })
}

fn check_webhooks(
    checker: &mut Checker<'_>,
    entries: Vec<(WebhookConfig, EntrySpans)>,
) -> Vec<Webhook> {
    let mut seen = HashSet::new();
    let mut webhooks = Vec::new();
    for (spec, spans) in entries {
        let index = spans.index;
        if !seen.insert(spec.name.clone()) {
            checker.push(
                Some(spans.key("name")),
                format!("webhooks[{index}].name"),
                format!(
                    "webhook name `{}` is used twice; give each webhook a unique name",
                    spec.name
                ),
            );
            continue;
        }
        match spec.to_webhook() {
            Ok(webhook) => webhooks.push(webhook),
            Err(problems) => {
                for (key, message) in problems {
                    checker.push(
                        Some(spans.key(&key)),
                        format!("webhooks[{index}].{key}"),
                        message,
                    );
                }
            }
        }
    }
    webhooks
}

/// Checks that an id can be used as one MQTT topic level and in URLs.
pub fn check_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "id `{id}` is invalid; use 1 to 64 letters, digits, `-`, `_` or `.`, because ids \
             appear in MQTT topics and URLs"
        ))
    }
}
