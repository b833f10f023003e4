//! MQTT accounts: who may connect to the embedded broker, and which topics each account
//! may publish and subscribe to.
//!
//! Devices log in with their device id as username and the password whose argon2 hash is
//! their `mqtt_password_hash`. Other clients (`[[mqtt_users]]`) may only subscribe, to
//! the topics of their sites. With no account configured the broker is open: anyone who
//! reaches the port may connect and publish to any topic, which `security::check_listeners`
//! allows on loopback only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::guard::GuardPolicy;
use super::login::{
    FAILURE_TABLE_CAPACITY, FailureLimiter, FailureLimits, FailureOutcome, PasswordCheckers,
    VERIFIED_CAPACITY, VerifiedLogins,
};
use crate::config::Config;
use crate::metrics::SharedRegistry;
use crate::model::{DeviceId, SiteId};

/// Password checks that run at once; each takes tens of milliseconds of CPU, so this
/// bounds what a flood of CONNECT packets can cost.
const CONCURRENT_PASSWORD_CHECKS: usize = 2;
/// How often one denial reason is logged at WARN; repeats in between are counted.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Who an authenticated connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MqttIdentity {
    /// A configured device: publishes its own telemetry and status, subscribes to nothing.
    Device { device: DeviceId, site: SiteId },
    /// An `[[mqtt_users]]` account: subscribes to its sites' topics, publishes nothing.
    Viewer {
        username: String,
        sites: Vec<SiteId>,
    },
}

impl MqttIdentity {
    /// Returns whether this identity may publish to `topic`, which is also the check for
    /// a last will's topic.
    pub fn may_publish(&self, topic: &str) -> bool {
        let MqttIdentity::Device { device, site } = self else {
            return false;
        };
        let telemetry = format!("telemetry/{site}/{device}");
        topic == telemetry
            || topic
                .strip_prefix(&telemetry)
                .is_some_and(|rest| rest.starts_with('/'))
            || topic == format!("status/{site}/{device}")
    }

    /// Returns whether this identity may subscribe to `filter`. A shared subscription
    /// (`$share/{group}/{filter}`) is checked by its filter.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let MqttIdentity::Viewer { sites, .. } = self else {
            return false;
        };
        let filter = match filter.strip_prefix("$share/") {
            Some(shared) => match shared.split_once('/') {
                Some((_group, filter)) => filter,
                None => return false,
            },
            None => filter,
        };
        sites.iter().any(|site| {
            ["telemetry", "status"]
                .iter()
                .any(|kind| filter.starts_with(&format!("{kind}/{site}/")))
        })
    }

    /// Returns whether a connection of this identity may use `client_id`. A device uses
    /// its id, so it has at most one connection (rumqttd closes the older of two with one
    /// client id) and cannot close another device's connection. A viewer uses its
    /// username, `{username}:{anything}`, or an empty id that the broker assigns.
    fn client_id_allowed(&self, username: &str, client_id: &str) -> bool {
        match self {
            MqttIdentity::Device { .. } => client_id == username,
            MqttIdentity::Viewer { .. } => {
                client_id.is_empty()
                    || client_id == username
                    || client_id
                        .strip_prefix(username)
                        .is_some_and(|rest| rest.starts_with(':'))
            }
        }
    }
}

struct Account {
    password_hash: String,
    identity: MqttIdentity,
}

/// An account as a connection found it at CONNECT; see [`MqttAccounts::still_valid`].
#[derive(Clone, Debug)]
pub struct LoginAccount {
    password_hash: String,
    identity: MqttIdentity,
}

/// The configured MQTT accounts, by username.
#[derive(Default)]
pub struct MqttAccounts {
    accounts: HashMap<String, Account>,
}

impl MqttAccounts {
    /// Collects the devices that have an `mqtt_password_hash` and the `[[mqtt_users]]`.
    pub fn from_config(config: &Config) -> MqttAccounts {
        let mut accounts = HashMap::new();
        for device in &config.devices {
            if let Some(hash) = &device.mqtt_password_hash {
                let identity = MqttIdentity::Device {
                    device: device.id.clone(),
                    site: device.site.clone(),
                };
                accounts.insert(
                    device.id.to_string(),
                    Account {
                        password_hash: hash.as_str().to_owned(),
                        identity,
                    },
                );
            }
        }
        for user in &config.mqtt_users {
            let identity = MqttIdentity::Viewer {
                username: user.username.clone(),
                sites: user.sites.clone(),
            };
            accounts.insert(
                user.username.clone(),
                Account {
                    password_hash: user.password_hash.clone(),
                    identity,
                },
            );
        }
        MqttAccounts { accounts }
    }

    /// Returns true when no account is configured, so the broker accepts anyone.
    pub fn is_open(&self) -> bool {
        self.accounts.is_empty()
    }

    pub fn identity(&self, username: &str) -> Option<&MqttIdentity> {
        self.accounts.get(username).map(|a| &a.identity)
    }

    /// Returns whether a connection that logged in as `username` when its account was
    /// `login` may stay connected with the account as it is now. It may not when the
    /// account was removed or its password changed. A device that moved to another site
    /// stays, because its publishes are checked against its current site. A viewer whose
    /// sites changed does not, because its subscriptions were checked against its old
    /// sites.
    pub fn still_valid(&self, username: &str, login: &LoginAccount) -> bool {
        let Some(account) = self.accounts.get(username) else {
            return false;
        };
        if account.password_hash != login.password_hash {
            return false;
        }
        match (&account.identity, &login.identity) {
            (MqttIdentity::Device { .. }, MqttIdentity::Device { .. }) => true,
            (now, then) => now == then,
        }
    }

    /// Returns the account of `username` as it is now, for [`Self::still_valid`].
    pub fn login_account(&self, username: &str) -> Option<LoginAccount> {
        self.accounts.get(username).map(|a| LoginAccount {
            password_hash: a.password_hash.clone(),
            identity: a.identity.clone(),
        })
    }

    /// Returns the usernames of the accounts.
    pub fn usernames(&self) -> impl Iterator<Item = &str> {
        self.accounts.keys().map(String::as_str)
    }

    /// Returns the argon2 PHC string of `username`'s password.
    pub fn password_hash(&self, username: &str) -> Option<&str> {
        self.accounts
            .get(username)
            .map(|a| a.password_hash.as_str())
    }
}

/// The broker's accounts. Whether the broker is open is fixed at start, because rumqttd's
/// authentication handler is installed at start. The accounts of a broker with accounts
/// are replaced when a reload or device change changes them.
pub struct SharedAccounts {
    current: RwLock<Arc<MqttAccounts>>,
    /// Counts replacements, so a connection checks its account again only after one.
    generation: AtomicU64,
    open: bool,
}

impl SharedAccounts {
    pub fn new(accounts: MqttAccounts) -> Self {
        Self {
            open: accounts.is_open(),
            current: RwLock::new(Arc::new(accounts)),
            generation: AtomicU64::new(0),
        }
    }

    /// Returns true when the broker started with no account, so it accepts anyone.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Returns the number of replacements so far. Read it before [`Self::load`]: a
    /// replacement in between then shows as a newer generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Returns the accounts in use.
    pub fn load(&self) -> Arc<MqttAccounts> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the accounts of a broker that started with accounts, returning whether it
    /// did. An open broker stays open until a restart.
    pub fn replace(&self, accounts: MqttAccounts) -> bool {
        if self.open {
            return false;
        }
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(accounts);
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }
}

/// Checks a CONNECT's credentials and client id against `accounts`, using the
/// verified-login cache and the failed-login backoff of `login`.
///
/// A cached credential is accepted without argon2, even while its username is in
/// backoff. Otherwise a username in backoff is denied without argon2, and the argon2
/// check runs on [`PasswordCheckers`], at most `CONCURRENT_PASSWORD_CHECKS` at once. An
/// unknown username is checked against a dummy hash, so the time taken does not tell
/// which usernames exist.
pub async fn authenticate(
    accounts: &MqttAccounts,
    login: &LoginPolicy,
    client_id: &str,
    username: &str,
    password: String,
) -> Result<(), LoginDenial> {
    let account = accounts.accounts.get(username);
    let client_id_allowed =
        |account: &Account| account.identity.client_id_allowed(username, client_id);
    if let Some(account) = account
        && login
            .verified
            .contains(username, &account.password_hash, password.as_bytes())
    {
        return if client_id_allowed(account) {
            Ok(())
        } else {
            Err(LoginDenial::ClientIdNotAllowed)
        };
    }
    if let Some(remaining) = login
        .usernames
        .backoff_remaining(&username.to_owned(), Instant::now())
    {
        return Err(LoginDenial::Backoff(remaining));
    }

    let hash = account.map_or_else(|| dummy_hash().to_owned(), |a| a.password_hash.clone());
    let verified = login.checkers.verify(password.clone(), hash).await;

    let now = Instant::now();
    match account {
        Some(account) if verified => {
            login
                .verified
                .insert(username, &account.password_hash, password.as_bytes());
            login.usernames.record_success(&username.to_owned(), now);
            if client_id_allowed(account) {
                Ok(())
            } else {
                Err(LoginDenial::ClientIdNotAllowed)
            }
        }
        _ => {
            let outcome = login.usernames.record_failure(&username.to_owned(), now);
            Err(LoginDenial::WrongPassword(outcome))
        }
    }
}

/// Reason that [`authenticate`] denied a login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginDenial {
    /// Unknown username or wrong password, with what the failure did to the backoff.
    WrongPassword(FailureOutcome),
    /// A correct password with a client id that does not belong to the username.
    ClientIdNotAllowed,
    /// The username is in backoff for this much longer, so argon2 did not run.
    Backoff(Duration),
}

impl LoginDenial {
    pub fn reason(self) -> DenyReason {
        match self {
            LoginDenial::Backoff(_) => DenyReason::LoginBackoff,
            _ => DenyReason::BadCredentials,
        }
    }
}

/// Login-flood protection shared by the broker's authentication handler and the MQTT
/// over TLS relay; see [`super::login`].
pub struct LoginPolicy {
    pub verified: VerifiedLogins,
    /// Failed logins by username.
    pub usernames: FailureLimiter<String>,
    /// Failed logins by source address, known only to the MQTT over TLS relay.
    pub sources: FailureLimiter<IpAddr>,
    checkers: PasswordCheckers,
}

impl LoginPolicy {
    pub fn new(limits: FailureLimits) -> Self {
        Self {
            verified: VerifiedLogins::new(VERIFIED_CAPACITY),
            usernames: FailureLimiter::new(limits, FAILURE_TABLE_CAPACITY),
            sources: FailureLimiter::new(limits, FAILURE_TABLE_CAPACITY),
            checkers: PasswordCheckers::new(CONCURRENT_PASSWORD_CHECKS),
        }
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| crate::security::hash_password("no such account").unwrap_or_default())
}

/// Builds rumqttd's authentication handler over the policy's accounts.
pub fn auth_handler(
    policy: Arc<GuardPolicy>,
) -> impl Fn(String, String, String) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync + 'static
{
    move |client_id: String, username: String, password: String| {
        let policy = policy.clone();
        Box::pin(async move {
            let accounts = policy.accounts.load();
            let outcome =
                authenticate(&accounts, &policy.login, &client_id, &username, password).await;
            let Err(denial) = outcome else {
                return true;
            };
            let subject = match denial {
                LoginDenial::Backoff(remaining) => format!(
                    "username `{username}`, {} s of backoff left after repeated failed logins",
                    remaining.as_secs().max(1)
                ),
                LoginDenial::WrongPassword(FailureOutcome::BackoffStarted) => {
                    let backoff = policy.login.usernames.limits().backoff;
                    format!(
                        "username `{username}`, failed logins reached the limit; denied \
                         without a password check for {}",
                        humantime::format_duration(backoff)
                    )
                }
                _ => format!("username `{username}`"),
            };
            policy.denials.deny(denial.reason(), &client_id, &subject);
            false
        })
    }
}

/// Why the broker denied a connection or a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// Unknown username, wrong password, no credentials, or a client id that does not
    /// belong to the username.
    BadCredentials,
    /// A publish to a topic the account may not publish to.
    PublishNotAllowed,
    /// A subscribe filter the account may not subscribe to.
    SubscribeNotAllowed,
    /// A last will on a topic the account may not publish to.
    WillNotAllowed,
    /// A publish above `[mqtt] max_messages_per_second` and `max_burst_messages`.
    RateLimited,
    /// A login of a username or source address in backoff after `[mqtt]
    /// max_failed_logins` failed logins in a row.
    LoginBackoff,
    /// A CONNECT with a client id in backoff after more than `[mqtt]
    /// max_client_takeovers_per_minute` takeovers.
    TakeoverBackoff,
    /// A TLS client whose certificate's common name is not its CONNECT username.
    CertificateMismatch,
    /// A second CONNECT on a connection, which closes it.
    SecondConnect,
    /// A live connection whose account was removed, got a new password, or (for an
    /// `[[mqtt_users]]` account) changed its sites, which closes it.
    AccountChanged,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::BadCredentials => "bad_credentials",
            DenyReason::PublishNotAllowed => "publish_not_allowed",
            DenyReason::SubscribeNotAllowed => "subscribe_not_allowed",
            DenyReason::WillNotAllowed => "will_not_allowed",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::LoginBackoff => "login_backoff",
            DenyReason::TakeoverBackoff => "takeover_backoff",
            DenyReason::CertificateMismatch => "certificate_mismatch",
            DenyReason::SecondConnect => "second_connect",
            DenyReason::AccountChanged => "account_changed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Counts denials in `stonelion_mqtt_denied_total{reason}` and logs them at WARN, at most
/// once per reason per interval.
pub struct MqttDenials {
    denied: Family<ReasonLabel, Counter>,
    last_logged: Mutex<HashMap<DenyReason, (Instant, u64)>>,
}

impl MqttDenials {
    pub fn new(registry: &SharedRegistry) -> Self {
        let denied = Family::<ReasonLabel, Counter>::default();
        registry.register(|r| {
            r.register(
                "mqtt_denied",
                "MQTT connections and packets denied by the broker, by reason",
                denied.clone(),
            );
        });
        Self {
            denied,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a denial and logs it with the client id and the topic or username
    /// (`subject`). Passwords are never passed here.
    pub fn deny(&self, reason: DenyReason, client_id: &str, subject: &str) {
        self.denied
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .inc();
        self.log(reason, client_id, subject);
    }

    /// Logs a denial without counting it, sharing the reason's log interval.
    pub fn log(&self, reason: DenyReason, client_id: &str, subject: &str) {
        let now = Instant::now();
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = last
            .entry(reason)
            .or_insert((now.checked_sub(LOG_INTERVAL).unwrap_or(now), 0));
        if now.duration_since(entry.0) < LOG_INTERVAL {
            entry.1 += 1;
            return;
        }
        let suppressed = entry.1;
        *entry = (now, 0);
        drop(last);
        tracing::warn!(
            reason = reason.as_str(),
            client_id,
            subject,
            suppressed_since_last_log = suppressed,
            "MQTT client denied"
        );
    }

    pub fn count(&self, reason: DenyReason) -> u64 {
        self.denied
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> MqttIdentity {
        MqttIdentity::Device {
            device: DeviceId::from("gas-01"),
            site: SiteId::from("plant-a"),
        }
    }

    #[test]
    fn device_publishes_own_topics_only() {
        let id = device();
        assert!(id.may_publish("telemetry/plant-a/gas-01"));
        assert!(id.may_publish("telemetry/plant-a/gas-01/gas_lel"));
        assert!(id.may_publish("status/plant-a/gas-01"));
        assert!(!id.may_publish("telemetry/plant-a/gas-02"));
        assert!(!id.may_publish("telemetry/plant-a/gas-011"));
        assert!(!id.may_publish("status/plant-a/gas-01/x"));
        assert!(!id.may_publish("telemetry/park-b3/gas-01"));
        assert!(!id.may_subscribe("telemetry/plant-a/gas-01"));
    }

    #[test]
    fn viewer_subscribes_to_own_sites() {
        let id = MqttIdentity::Viewer {
            username: "dash".to_owned(),
            sites: vec![SiteId::from("plant-a")],
        };
        assert!(id.may_subscribe("telemetry/plant-a/#"));
        assert!(id.may_subscribe("status/plant-a/+"));
        assert!(id.may_subscribe("$share/g/telemetry/plant-a/#"));
        assert!(!id.may_subscribe("telemetry/#"));
        assert!(!id.may_subscribe("telemetry/+/gas-01"));
        assert!(!id.may_subscribe("#"));
        assert!(!id.may_subscribe("telemetry/plant-a"));
        assert!(!id.may_subscribe("telemetry/park-b3/#"));
        assert!(!id.may_publish("telemetry/plant-a/gas-01"));
    }

    #[test]
    fn client_id_rules() {
        assert!(device().client_id_allowed("gas-01", "gas-01"));
        assert!(!device().client_id_allowed("gas-01", "gas-02"));
        assert!(!device().client_id_allowed("gas-01", ""));
        let viewer = MqttIdentity::Viewer {
            username: "dash".to_owned(),
            sites: vec![],
        };
        assert!(viewer.client_id_allowed("dash", "dash:1"));
        assert!(viewer.client_id_allowed("dash", ""));
        assert!(!viewer.client_id_allowed("dash", "dashboard"));
    }
}
