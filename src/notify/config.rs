//! Webhook configuration as written in the config file, and the checked form the dispatcher uses.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::alarms::event::EventKind;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One webhook receiver of alarm events, as written in the config file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name of the webhook, used in metrics, logs and the outbox table.
    /// Renaming a webhook leaves its pending deliveries under the old name.
    pub name: String,
    /// Receiver URL; `http` or `https` only. Redirects are not followed.
    pub url: String,
    /// Shared secret for the `X-Stonelion-Signature` HMAC. Set this or `secret_env`.
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of an environment variable that contains the secret, so the file need not.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Time limit for one delivery attempt, from connect to the end of the response,
    /// such as "5s". Default: 10s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Wait after the first failed attempt, such as "1s"; it doubles after each further
    /// failure, with jitter. Default: 1s.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap on the wait between attempts, such as "1m". Default: 60s.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Event kinds to send, such as `["alarm.raised", "alarm.cleared"]`. Default: all kinds.
    #[serde(default)]
    pub events: Option<Vec<EventKind>>,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_initial_backoff() -> Duration {
    DEFAULT_INITIAL_BACKOFF
}

fn default_max_backoff() -> Duration {
    DEFAULT_MAX_BACKOFF
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("timeout", &self.timeout)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("events", &self.events)
            .finish()
    }
}

/// A config problem: the key relative to the webhook's table, and a message with the fix.
pub type ConfigProblem = (String, String);

impl WebhookConfig {
    /// Checks every field and returns one entry per problem; empty when the config is usable.
    ///
    /// Keys are relative to this webhook's table (`url`, `secret_env`), so the caller
    /// prefixes them with the table's path.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.to_owned(), message));

        if self.name.trim().is_empty() {
            problem(
                "name",
                "webhook name is empty: give each webhook a unique name".into(),
            );
        }
        if let Err(message) = parse_url(&self.url) {
            problem("url", message);
        }
        if let Err((key, message)) = self.resolve_secret() {
            problem(key, message);
        }
        if self.timeout.is_zero() {
            problem(
                "timeout",
                "timeout is zero: set a limit such as \"10s\"".into(),
            );
        }
        if self.initial_backoff.is_zero() {
            problem(
                "initial_backoff",
                "initial_backoff is zero: set a wait such as \"1s\"".into(),
            );
        }
        if self.max_backoff < self.initial_backoff {
            let message = format!(
                "max_backoff ({}) is less than initial_backoff ({}): raise max_backoff",
                humantime::format_duration(self.max_backoff),
                humantime::format_duration(self.initial_backoff),
            );
            problem("max_backoff", message);
        }
        if self.events.as_ref().is_some_and(Vec::is_empty) {
            let message = "events is empty, so this webhook would receive nothing: \
                           list event kinds or remove the key to send all kinds";
            problem("events", message.into());
        }
        problems
    }

    /// Checks the config and builds the runtime form, reading `secret_env` from the environment.
    pub fn to_webhook(&self) -> Result<Webhook, Vec<ConfigProblem>> {
        let problems = self.validate();
        if !problems.is_empty() {
            return Err(problems);
        }

        let url = parse_url(&self.url).map_err(|message| vec![("url".to_owned(), message)])?;
        let secret = self
            .resolve_secret()
            .map_err(|(key, message)| vec![(key.to_owned(), message)])?;
        Ok(Webhook {
            name: self.name.clone(),
            url,
            secret,
            timeout: self.timeout,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            events: self
                .events
                .as_ref()
                .map(|kinds| kinds.iter().copied().collect()),
        })
    }

    fn resolve_secret(&self) -> Result<Secret, (&'static str, String)> {
        match (&self.secret, &self.secret_env) {
            (Some(_), Some(_)) => Err((
                "secret",
                "both secret and secret_env are set: keep only one".into(),
            )),
            (None, None) => Err((
                "secret",
                "no secret: set secret_env to the name of an environment variable \
                 that contains the secret, or set secret"
                    .into(),
            )),
            (Some(secret), None) if secret.is_empty() => Err((
                "secret",
                "secret is empty: set a random string of at least 32 characters".into(),
            )),
            (Some(secret), None) => Ok(Secret(secret.clone())),
            (None, Some(var)) => match std::env::var(var) {
                Ok(secret) if secret.is_empty() => Err((
                    "secret_env",
                    format!("environment variable {var} is empty: set it to the secret"),
                )),
                Ok(secret) => Ok(Secret(secret)),
                Err(std::env::VarError::NotPresent) => Err((
                    "secret_env",
                    format!("environment variable {var} is not set: export it before starting"),
                )),
                Err(std::env::VarError::NotUnicode(_)) => Err((
                    "secret_env",
                    format!("environment variable {var} is not valid UTF-8: set a text secret"),
                )),
            },
        }
    }
}

fn parse_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| {
        format!(
            "invalid URL {}: {e}; write a full URL such as https://host/path",
            redact_url(url)
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "unsupported URL scheme {:?}: use http or https",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "URL {} has no host: add the receiver's host",
            redact_url(url)
        ));
    }
    Ok(parsed)
}

/// Returns the URL without user info, path and query, because receivers often put tokens
/// there. An unparsable URL becomes a placeholder.
pub(crate) fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(parsed) => {
            let host = parsed.host_str().unwrap_or("");
            match parsed.port() {
                Some(port) => format!("{}://{host}:{port}/...", parsed.scheme()),
                None => format!("{}://{host}/...", parsed.scheme()),
            }
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// A webhook secret. Its `Debug` output is redacted so it never reaches a log.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A checked webhook, built by [`WebhookConfig::to_webhook`].
#[derive(Clone)]
pub struct Webhook {
    pub name: String,
    pub url: Url,
    pub secret: Secret,
    /// Time limit for one attempt.
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Event kinds to send; `None` sends every kind.
    pub events: Option<HashSet<EventKind>>,
}

impl Webhook {
    /// Returns `true` if this webhook receives events of `kind`.
    pub fn subscribes_to(&self, kind: EventKind) -> bool {
        self.events
            .as_ref()
            .is_none_or(|kinds| kinds.contains(&kind))
    }

    /// Returns the URL without user info, path and query, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.as_str())
    }
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("events", &self.events)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> WebhookConfig {
        toml::from_str(toml_text).expect("config parses")
    }

    fn keys(problems: &[ConfigProblem]) -> Vec<&str> {
        problems.iter().map(|(key, _)| key.as_str()).collect()
    }

    #[test]
    fn defaults_apply_and_config_is_valid() {
        let config = parse("name = \"ops\"\nurl = \"https://example.com/hook\"\nsecret = \"s3\"");

        assert!(config.validate().is_empty());
        assert_eq!(config.timeout, DEFAULT_TIMEOUT);
        assert_eq!(config.initial_backoff, DEFAULT_INITIAL_BACKOFF);
        assert_eq!(config.max_backoff, DEFAULT_MAX_BACKOFF);
        let webhook = config.to_webhook().expect("valid config builds");
        assert!(webhook.subscribes_to(EventKind::DeviceOffline));
    }

    #[test]
    fn durations_and_events_parse() {
        let config = parse(
            "name = \"ops\"\nurl = \"http://127.0.0.1:9000/\"\nsecret = \"s\"\n\
             timeout = \"5s\"\ninitial_backoff = \"200ms\"\nmax_backoff = \"2m\"\n\
             events = [\"alarm.raised\", \"device.offline\"]",
        );

        assert_eq!(config.timeout, Duration::from_secs(5));
        assert_eq!(config.initial_backoff, Duration::from_millis(200));
        assert_eq!(config.max_backoff, Duration::from_secs(120));
        let webhook = config.to_webhook().expect("valid config builds");
        assert!(webhook.subscribes_to(EventKind::Raised));
        assert!(!webhook.subscribes_to(EventKind::Cleared));
    }

    #[test]
    fn unknown_key_and_event_kind_rejected() {
        let unknown_key = "name = \"a\"\nurl = \"https://h/\"\nsecret = \"s\"\nretries = 3";
        let unknown_kind = "name = \"a\"\nurl = \"https://h/\"\nsecret = \"s\"\nevents = [\"x\"]";

        assert!(toml::from_str::<WebhookConfig>(unknown_key).is_err());
        assert!(toml::from_str::<WebhookConfig>(unknown_kind).is_err());
    }

    #[test]
    fn url_scheme_and_syntax_checked() {
        let ftp = parse("name = \"a\"\nurl = \"ftp://host/x\"\nsecret = \"s\"");
        let relative = parse("name = \"a\"\nurl = \"/hook\"\nsecret = \"s\"");

        assert_eq!(keys(&ftp.validate()), ["url"]);
        assert!(ftp.validate()[0].1.contains("use http or https"));
        assert_eq!(keys(&relative.validate()), ["url"]);
    }

    #[test]
    fn secret_problems_reported() {
        let empty = parse("name = \"a\"\nurl = \"https://h/\"\nsecret = \"\"");
        let both = parse("name = \"a\"\nurl = \"https://h/\"\nsecret = \"s\"\nsecret_env = \"X\"");
        let none = parse("name = \"a\"\nurl = \"https://h/\"");
        let missing_env =
            parse("name = \"a\"\nurl = \"https://h/\"\nsecret_env = \"STONELION_TEST_UNSET_VAR\"");

        assert_eq!(keys(&empty.validate()), ["secret"]);
        assert_eq!(keys(&both.validate()), ["secret"]);
        assert_eq!(keys(&none.validate()), ["secret"]);
        assert_eq!(keys(&missing_env.validate()), ["secret_env"]);
        assert!(
            missing_env.validate()[0]
                .1
                .contains("STONELION_TEST_UNSET_VAR is not set")
        );
    }

    #[test]
    fn secret_env_read_from_environment() {
        // PATH is set in every test environment, and setting a variable here would need
        // `unsafe` in edition 2024.
        let config = parse("name = \"a\"\nurl = \"https://h/\"\nsecret_env = \"PATH\"");
        let path = std::env::var("PATH").expect("PATH is set");

        let webhook = config.to_webhook().expect("valid config builds");
        assert_eq!(webhook.secret.expose(), path.as_bytes());
    }

    #[test]
    fn backoff_and_events_checked() {
        let config = parse(
            "name = \"a\"\nurl = \"https://h/\"\nsecret = \"s\"\ntimeout = \"0s\"\n\
             initial_backoff = \"10s\"\nmax_backoff = \"1s\"\nevents = []",
        );

        assert_eq!(
            keys(&config.validate()),
            ["timeout", "max_backoff", "events"]
        );
        assert!(config.to_webhook().is_err());
    }

    #[test]
    fn debug_output_redacts_secret_and_url_path() {
        let config = parse(
            "name = \"a\"\nurl = \"https://user:pw@h.example/token123?k=v\"\nsecret = \"hunter2\"",
        );
        let webhook = config.to_webhook().expect("valid config builds");

        for text in [format!("{config:?}"), format!("{webhook:?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("token123"), "{text}");
            assert!(!text.contains("pw"), "{text}");
            assert!(text.contains("h.example"), "{text}");
        }
    }
}
