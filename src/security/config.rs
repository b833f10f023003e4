//! Config sections for credentials and TLS: `[mqtt]`, `[[mqtt_users]]`, `[api]` and
//! `[[api_tokens]]` (the last in [`super::tokens`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::tokens::{ApiTokenSpec, TokenSet};
use crate::config::check::{Checker, EntrySpans};
use crate::config::{Device, Site, check_id};
use crate::model::SiteId;

/// Shortest and longest `failed_login_backoff` and `client_takeover_backoff`.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Highest `[mqtt] max_connections`; rumqttd reserves its tables for this many at start.
const MAX_CONNECTIONS: usize = 100_000;

/// `[mqtt]`: limits per connection and the optional MQTT over TLS listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// Messages per second that one connection may publish on average; publishes above
    /// the rate are dropped and counted.
    pub max_messages_per_second: f64,
    /// Messages that one connection may publish at once above the average rate.
    pub max_burst_messages: u32,
    /// Failed logins in a row for one username, or one source address on the TLS
    /// listener, after which its logins are denied for `failed_login_backoff`; 0 turns
    /// the limit off.
    pub max_failed_logins: u32,
    #[serde(with = "humantime_serde")]
    pub failed_login_backoff: Duration,
    /// Takeovers of one client id per minute (a new connection with the client id of a
    /// live one) above which its new connections are denied for `client_takeover_backoff`;
    /// 0 turns the limit off.
    pub max_client_takeovers_per_minute: u32,
    #[serde(with = "humantime_serde")]
    pub client_takeover_backoff: Duration,
    /// Maximum number of client connections open at once, on both listeners together.
    pub max_connections: usize,
    /// Address of the MQTT over TLS listener, such as `0.0.0.0:8883`; needs `tls_cert`
    /// and `tls_key`.
    pub tls_listen: Option<SocketAddr>,
    /// Server certificate chain, PEM.
    pub tls_cert: Option<PathBuf>,
    /// Private key of the server certificate, PEM (PKCS #8, PKCS #1 or SEC 1).
    pub tls_key: Option<PathBuf>,
    /// CA certificates, PEM. When set, TLS clients must present a certificate that one of
    /// them signed, in addition to their username and password.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            max_messages_per_second: 50.0,
            max_burst_messages: 200,
            max_failed_logins: 10,
            failed_login_backoff: Duration::from_secs(60),
            max_client_takeovers_per_minute: 5,
            client_takeover_backoff: Duration::from_secs(60),
            max_connections: 10_000,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// `[[mqtt_users]]`: an MQTT client that is not a device, such as a dashboard or an
/// integration that subscribes to the telemetry of some sites. It cannot publish.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttUserSpec {
    /// MQTT username; must not be a device id. Its client id must be the username, or
    /// start with `{username}:`.
    pub username: String,
    /// argon2 PHC string from `stonelion hash-password`.
    pub password_hash: String,
    /// Sites whose `telemetry/{site}/...` and `status/{site}/...` topics it may subscribe to.
    pub sites: Vec<SiteId>,
}

impl std::fmt::Debug for MqttUserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUserSpec")
            .field("username", &self.username)
            .field("sites", &self.sites)
            .finish_non_exhaustive()
    }
}

/// `[api]`: TLS for the HTTP API and per-request limits of the InfluxQL `/query`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Server certificate chain, PEM. With `tls_key`, the API serves HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// Private key of the server certificate, PEM.
    pub tls_key: Option<PathBuf>,
    /// CA certificates, PEM. When set, HTTPS clients must present a certificate that one
    /// of them signed, and API tokens still apply on top.
    pub tls_client_ca: Option<PathBuf>,
    /// Maximum number of series one `/query` request selects.
    pub query_max_series: u64,
    /// Maximum number of raw points one `/query` request reads.
    pub query_max_points: u64,
    /// Maximum number of `GROUP BY time()` buckets of one `/query` request, summed over
    /// output series.
    pub query_max_buckets: u64,
}

impl Default for ApiSection {
    fn default() -> Self {
        let limits = crate::api::influxql::QueryLimits::default();
        ApiSection {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            query_max_series: limits.max_series,
            query_max_points: limits.max_points,
            query_max_buckets: limits.max_buckets,
        }
    }
}

impl ApiSection {
    /// The `/query` limits that the section sets.
    pub fn query_limits(&self) -> crate::api::influxql::QueryLimits {
        crate::api::influxql::QueryLimits {
            max_series: self.query_max_series,
            max_points: self.query_max_points,
            max_buckets: self.query_max_buckets,
        }
    }
}

/// Checks `[mqtt]`: a finite, non-negative rate, and TLS files that go together.
pub fn check_mqtt(checker: &mut Checker<'_>, mqtt: &MqttSection) {
    if !mqtt.max_messages_per_second.is_finite() || mqtt.max_messages_per_second < 0.0 {
        checker.push(
            None,
            "mqtt.max_messages_per_second",
            "must be a number of 0 or more; 0 turns the limit off",
        );
    }
    if !(1..=MAX_CONNECTIONS).contains(&mqtt.max_connections) {
        checker.push(
            None,
            "mqtt.max_connections",
            format!(
                "must be from 1 to {MAX_CONNECTIONS}, not {}",
                mqtt.max_connections
            ),
        );
    }
    let backoffs = [
        (
            "failed_login_backoff",
            mqtt.max_failed_logins,
            mqtt.failed_login_backoff,
        ),
        (
            "client_takeover_backoff",
            mqtt.max_client_takeovers_per_minute,
            mqtt.client_takeover_backoff,
        ),
    ];
    for (key, limit, backoff) in backoffs {
        if limit > 0 && !(MIN_BACKOFF..=MAX_BACKOFF).contains(&backoff) {
            checker.push(
                None,
                format!("mqtt.{key}"),
                format!(
                    "must be from 1s to 1h, not {}",
                    humantime::format_duration(backoff)
                ),
            );
        }
    }
    let files = [
        ("tls_cert", mqtt.tls_cert.is_some()),
        ("tls_key", mqtt.tls_key.is_some()),
    ];
    match mqtt.tls_listen {
        Some(_) => {
            for (key, present) in files {
                if !present {
                    checker.push(
                        None,
                        format!("mqtt.{key}"),
                        format!("missing; `tls_listen` needs `{key}`"),
                    );
                }
            }
        }
        None => {
            let set = files
                .iter()
                .filter(|(_, present)| *present)
                .map(|(key, _)| *key);
            let set = set.chain(mqtt.tls_client_ca.is_some().then_some("tls_client_ca"));
            for key in set {
                checker.push(
                    None,
                    format!("mqtt.{key}"),
                    "is set but `tls_listen` is not; add `tls_listen = \"0.0.0.0:8883\"`",
                );
            }
        }
    }
}

/// Checks `[api]`: a certificate and a key, or neither, a client CA only with both, and
/// `/query` limits of at least 1.
pub fn check_api(checker: &mut Checker<'_>, api: &ApiSection) {
    match (&api.tls_cert, &api.tls_key) {
        (Some(_), None) => checker.push(None, "api.tls_key", "missing; `tls_cert` needs `tls_key`"),
        (None, Some(_)) => {
            checker.push(None, "api.tls_cert", "missing; `tls_key` needs `tls_cert`");
        }
        (None, None) if api.tls_client_ca.is_some() => checker.push(
            None,
            "api.tls_client_ca",
            "is set but `tls_cert` and `tls_key` are not; client certificates need HTTPS, so \
             set both or remove `tls_client_ca`",
        ),
        _ => {}
    }
    let limits = [
        ("query_max_series", api.query_max_series),
        ("query_max_points", api.query_max_points),
        ("query_max_buckets", api.query_max_buckets),
    ];
    for (key, value) in limits {
        if value == 0 {
            checker.push(None, format!("api.{key}"), "must be at least 1");
        }
    }
}

/// Checks `[[mqtt_users]]`: unique usernames that are not device ids, valid hashes and
/// declared sites.
pub fn check_mqtt_users(
    checker: &mut Checker<'_>,
    entries: Vec<(MqttUserSpec, EntrySpans)>,
    sites: &[Site],
    devices: &[Device],
) -> Vec<MqttUserSpec> {
    let mut seen = HashSet::new();
    let mut users = Vec::new();
    for (user, spans) in entries {
        let index = spans.index;
        let key = |field: &str| format!("mqtt_users[{index}].{field}");
        let mut ok = true;
        let mut problem = |checker: &mut Checker<'_>, field: &str, message: String| {
            checker.push(Some(spans.key(field)), key(field), message);
            ok = false;
        };
        if let Err(message) = check_id(&user.username) {
            problem(checker, "username", message);
        } else if devices.iter().any(|d| d.id.as_str() == user.username) {
            problem(
                checker,
                "username",
                format!(
                    "`{}` is a device id; give the user another name",
                    user.username
                ),
            );
        } else if !seen.insert(user.username.clone()) {
            problem(
                checker,
                "username",
                format!("username `{}` is used twice", user.username),
            );
        }
        if let Err(message) = crate::security::check_password_hash(&user.password_hash) {
            problem(checker, "password_hash", message);
        }
        if user.sites.is_empty() {
            problem(
                checker,
                "sites",
                "is empty; list the sites whose topics the user may subscribe to".to_owned(),
            );
        }
        for site in &user.sites {
            // A site whose entry is invalid is reported on its own.
            if !sites.iter().any(|s| s.id == *site) && !checker.is_written_site(site.as_str()) {
                problem(
                    checker,
                    "sites",
                    format!("unknown site `{site}`; declare it in [[sites]]"),
                );
            }
        }
        if ok
            && user
                .sites
                .iter()
                .all(|site| sites.iter().any(|s| s.id == *site))
        {
            users.push(user);
        }
    }
    users
}

/// Checks `[[api_tokens]]`: unique names and valid digests.
pub fn check_api_tokens(
    checker: &mut Checker<'_>,
    entries: Vec<(ApiTokenSpec, EntrySpans)>,
) -> TokenSet {
    let mut seen = HashSet::new();
    let mut tokens = Vec::new();
    for (spec, spans) in entries {
        let index = spans.index;
        let name = spec.name.trim();
        if name.is_empty() || name.chars().count() > 128 {
            checker.push(
                Some(spans.key("name")),
                format!("api_tokens[{index}].name"),
                "must be 1 to 128 characters",
            );
            continue;
        }
        if !seen.insert(name.to_owned()) {
            checker.push(
                Some(spans.key("name")),
                format!("api_tokens[{index}].name"),
                format!("token name `{name}` is used twice; alarm histories record it, so make it unique"),
            );
            continue;
        }
        match spec.check() {
            Ok(token) => tokens.push(token),
            Err(message) => checker.push(
                Some(spans.key("token_sha256")),
                format!("api_tokens[{index}].token_sha256"),
                message,
            ),
        }
    }
    TokenSet::new(tokens)
}
