//! Login-flood protection for the broker: a cache of recently verified credentials and a
//! backoff after repeated failed logins.
//!
//! A password check runs argon2, and only a few run at once, so a flood of CONNECTs with
//! wrong passwords would queue every device's login behind it. Two things keep devices
//! logging in during a flood:
//!
//! - [`VerifiedLogins`]: a device whose password was verified before logs in again
//!   without argon2. The cache stores an HMAC-SHA256 of the account's password hash and
//!   the password under a random per-process key, never the password, so a changed hash
//!   no longer matches. It contains at most [`VERIFIED_CAPACITY`] entries.
//! - [`FailureLimiter`]: after `max_failed_logins` failures in a row for one key (a
//!   username, or a source address where the TLS relay receives it), further attempts are
//!   denied without argon2 for `failed_login_backoff`. A cached credential still logs in
//!   during a username's backoff, so guessing a device's username cannot lock it out.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::auth::MqttAccounts;

type HmacSha256 = Hmac<Sha256>;

/// Maximum entries of the verified-login cache. At most one entry exists per account, so
/// this only matters with more accounts than this.
pub const VERIFIED_CAPACITY: usize = 65_536;
/// Maximum usernames or source addresses whose failures are tracked at once. When the
/// table is full, the key whose last failure is oldest and that is not in backoff is
/// dropped.
pub const FAILURE_TABLE_CAPACITY: usize = 16_384;

/// Cache of credentials verified recently, by username.
pub struct VerifiedLogins {
    key: [u8; 32],
    entries: Mutex<HashMap<String, VerifiedEntry>>,
    capacity: usize,
}

struct VerifiedEntry {
    tag: [u8; 32],
    last_used: Instant,
}

impl VerifiedLogins {
    pub fn new(capacity: usize) -> Self {
        Self {
            key: rand::random(),
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn mac(&self, username: &str, password_hash: &str, password: &[u8]) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes keys of any size");
        // Length prefixes keep the fields apart, so no two inputs encode alike.
        for field in [username.as_bytes(), password_hash.as_bytes(), password] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }

    /// Returns whether `password` was verified for `username` while its password hash was
    /// `password_hash`. The comparison takes constant time.
    pub fn contains(&self, username: &str, password_hash: &str, password: &[u8]) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(username) else {
            return false;
        };
        let matches = self
            .mac(username, password_hash, password)
            .verify_slice(&entry.tag)
            .is_ok();
        if matches {
            entry.last_used = Instant::now();
        }
        matches
    }

    /// Stores a verified credential, replacing the username's previous one. A full cache
    /// drops its least recently used entry.
    pub fn insert(&self, username: &str, password_hash: &str, password: &[u8]) {
        let tag = self
            .mac(username, password_hash, password)
            .finalize()
            .into_bytes()
            .into();
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(username) {
            let oldest = entries
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        let entry = VerifiedEntry {
            tag,
            last_used: Instant::now(),
        };
        entries.insert(username.to_owned(), entry);
    }

    /// Removes every entry whose account no longer exists in `accounts`. An entry whose
    /// account's hash changed no longer matches in [`Self::contains`] and is replaced at
    /// the next verified login.
    pub fn retain_accounts(&self, accounts: &MqttAccounts) {
        self.lock()
            .retain(|username, _| accounts.password_hash(username).is_some());
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VerifiedEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Limits of failed logins: `max_failures` in a row start a backoff of `backoff`.
#[derive(Clone, Copy, Debug)]
pub struct FailureLimits {
    /// Failures in a row that start a backoff; 0 turns the limit off.
    pub max_failures: u32,
    pub backoff: Duration,
}

/// Failed logins by key (username or source address), and the keys in backoff.
pub struct FailureLimiter<K> {
    limits: FailureLimits,
    capacity: usize,
    keys: Mutex<HashMap<K, FailureState>>,
}

struct FailureState {
    /// Failures since the last success or the last backoff.
    failures: u32,
    last_failure: Instant,
    backoff_until: Option<Instant>,
}

impl FailureState {
    fn in_backoff(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|until| now < until)
    }
}

/// Effect of a recorded failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Counted; the key is not in backoff.
    Counted,
    /// This failure reached the limit and started a backoff.
    BackoffStarted,
}

impl<K: Eq + Hash + Clone> FailureLimiter<K> {
    pub fn new(limits: FailureLimits, capacity: usize) -> Self {
        Self {
            limits,
            capacity: capacity.max(1),
            keys: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> FailureLimits {
        self.limits
    }

    /// Returns the time left of `key`'s backoff, or `None` when it may try to log in.
    pub fn backoff_remaining(&self, key: &K, now: Instant) -> Option<Duration> {
        let keys = self.lock();
        let until = keys.get(key)?.backoff_until?;
        (now < until).then(|| until - now)
    }

    /// Counts a failed login of `key`.
    pub fn record_failure(&self, key: &K, now: Instant) -> FailureOutcome {
        if self.limits.max_failures == 0 {
            return FailureOutcome::Counted;
        }
        let mut keys = self.lock();
        if !keys.contains_key(key) && keys.len() >= self.capacity {
            self.make_room(&mut keys, now);
        }
        let state = keys.entry(key.clone()).or_insert(FailureState {
            failures: 0,
            last_failure: now,
            backoff_until: None,
        });
        // Failures further apart than the backoff do not add up.
        if now.saturating_duration_since(state.last_failure) > self.limits.backoff {
            state.failures = 0;
        }
        state.last_failure = now;
        state.failures += 1;
        if state.failures >= self.limits.max_failures && !state.in_backoff(now) {
            state.failures = 0;
            state.backoff_until = Some(now + self.limits.backoff);
            return FailureOutcome::BackoffStarted;
        }
        FailureOutcome::Counted
    }

    /// Forgets `key`'s failures after a successful login. A running backoff stays.
    pub fn record_success(&self, key: &K, now: Instant) {
        let mut keys = self.lock();
        let in_backoff = keys.get(key).is_some_and(|state| state.in_backoff(now));
        if !in_backoff {
            keys.remove(key);
        }
    }

    /// Forgets `key`'s failures and ends its backoff.
    pub fn forget(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Forgets every key's failures and ends every backoff.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Drops expired entries, then the oldest one not in backoff if none expired.
    fn make_room(&self, keys: &mut HashMap<K, FailureState>, now: Instant) {
        let backoff = self.limits.backoff;
        keys.retain(|_, state| {
            state.in_backoff(now) || now.saturating_duration_since(state.last_failure) <= backoff
        });
        if keys.len() < self.capacity {
            return;
        }
        let oldest = keys
            .iter()
            .filter(|(_, state)| !state.in_backoff(now))
            .min_by_key(|(_, state)| state.last_failure)
            .map(|(key, _)| key.clone());
        if let Some(oldest) = oldest {
            keys.remove(&oldest);
        }
        // NOTE: when every tracked key is in backoff, the table grows past its capacity
        // by the keys added during one backoff. Each of them took `max_failures` failed
        // logins.
    }

    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, FailureState>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Threads that run argon2 password checks, at most `threads` at once.
///
/// Dedicated threads, rather than tokio's blocking pool, keep argon2's memory (19 MiB per
/// check at the default cost) in the allocator arenas of a fixed set of threads. On the
/// blocking pool a check can run on any of its threads, and glibc keeps freed memory in
/// the arena of the thread that freed it, so resident memory rose in steps of about
/// 20 MiB (docs/testing.md, soak test).
pub struct PasswordCheckers {
    jobs: Mutex<std::sync::mpsc::Sender<PasswordJob>>,
    slots: tokio::sync::Semaphore,
}

struct PasswordJob {
    password: String,
    hash: String,
    reply: tokio::sync::oneshot::Sender<bool>,
}

impl PasswordCheckers {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, queue) = std::sync::mpsc::channel::<PasswordJob>();
        let queue = std::sync::Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mqtt-password-check-{n}"))
                .spawn(move || {
                    loop {
                        let job = queue
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        // The sender is gone when the broker's policy is dropped.
                        let Ok(job) = job else { break };
                        let verified =
                            crate::security::verify_password(job.password.as_bytes(), &job.hash);
                        let _ = job.reply.send(verified);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, thread = n, "starting an MQTT password-check thread failed; fewer checks run at once");
            }
        }
        Self {
            jobs: Mutex::new(jobs),
            slots: tokio::sync::Semaphore::new(threads),
        }
    }

    /// Verifies `password` against the PHC string `hash`, waiting for a free thread.
    /// Returns false if no thread could run the check.
    pub async fn verify(&self, password: String, hash: String) -> bool {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the password-check semaphore is never closed");
        let (reply, verified) = tokio::sync::oneshot::channel();
        let job = PasswordJob {
            password,
            hash,
            reply,
        };
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job);
        if sent.is_err() {
            return false;
        }
        verified.await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn password_checkers_verify() {
        let hash = crate::security::hash_password("right").unwrap();
        let checkers = PasswordCheckers::new(2);
        assert!(checkers.verify("right".to_owned(), hash.clone()).await);
        assert!(!checkers.verify("wrong".to_owned(), hash).await);
        assert!(
            !checkers
                .verify("right".to_owned(), "not a hash".to_owned())
                .await
        );
    }

    #[test]
    fn verified_login_matches_same_hash_only() {
        let cache = VerifiedLogins::new(10);
        cache.insert("gas-01", "$argon2id$old", b"secret");
        assert!(cache.contains("gas-01", "$argon2id$old", b"secret"));
        assert!(!cache.contains("gas-01", "$argon2id$old", b"wrong"));
        assert!(!cache.contains("gas-01", "$argon2id$new", b"secret"));
        assert!(!cache.contains("gas-02", "$argon2id$old", b"secret"));
    }

    #[test]
    fn verified_cache_evicts_least_recent() {
        let cache = VerifiedLogins::new(2);
        cache.insert("a", "h", b"pa");
        cache.insert("b", "h", b"pb");
        assert!(cache.contains("a", "h", b"pa"));
        cache.insert("c", "h", b"pc");
        assert_eq!(cache.len(), 2);
        assert!(
            cache.contains("a", "h", b"pa"),
            "a was used last, so b goes"
        );
        assert!(!cache.contains("b", "h", b"pb"));
        assert!(cache.contains("c", "h", b"pc"));
    }

    #[test]
    fn verified_cache_keys_differ_per_process() {
        let first = VerifiedLogins::new(1);
        let second = VerifiedLogins::new(1);
        first.insert("a", "h", b"p");
        let tag = first.lock()["a"].tag;
        second.insert("a", "h", b"p");
        assert_ne!(tag, second.lock()["a"].tag);
    }

    fn limiter(max_failures: u32) -> FailureLimiter<String> {
        let limits = FailureLimits {
            max_failures,
            backoff: Duration::from_secs(60),
        };
        FailureLimiter::new(limits, 3)
    }

    #[test]
    fn failures_start_backoff_at_limit() {
        let limiter = limiter(3);
        let key = "gas-01".to_owned();
        let start = Instant::now();
        assert_eq!(limiter.record_failure(&key, start), FailureOutcome::Counted);
        assert_eq!(limiter.record_failure(&key, start), FailureOutcome::Counted);
        assert_eq!(limiter.backoff_remaining(&key, start), None);
        assert_eq!(
            limiter.record_failure(&key, start),
            FailureOutcome::BackoffStarted
        );
        let later = start + Duration::from_secs(10);
        assert_eq!(
            limiter.backoff_remaining(&key, later),
            Some(Duration::from_secs(50))
        );
        assert_eq!(
            limiter.backoff_remaining(&key, start + Duration::from_secs(60)),
            None
        );
    }

    #[test]
    fn success_resets_failures() {
        let limiter = limiter(2);
        let key = "gas-01".to_owned();
        let start = Instant::now();
        limiter.record_failure(&key, start);
        limiter.record_success(&key, start);
        assert_eq!(limiter.record_failure(&key, start), FailureOutcome::Counted);
    }

    #[test]
    fn spaced_failures_do_not_add_up() {
        let limiter = limiter(2);
        let key = "gas-01".to_owned();
        let start = Instant::now();
        limiter.record_failure(&key, start);
        let later = start + Duration::from_secs(61);
        assert_eq!(limiter.record_failure(&key, later), FailureOutcome::Counted);
    }

    #[test]
    fn zero_limit_never_backs_off() {
        let limiter = limiter(0);
        let key = "gas-01".to_owned();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(limiter.record_failure(&key, now), FailureOutcome::Counted);
        }
        assert_eq!(limiter.backoff_remaining(&key, now), None);
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn full_table_keeps_keys_in_backoff() {
        let limiter = limiter(2);
        let now = Instant::now();
        let target = "gas-01".to_owned();
        limiter.record_failure(&target, now);
        limiter.record_failure(&target, now);
        for n in 0..10 {
            limiter.record_failure(&format!("random-{n}"), now);
        }
        assert_eq!(limiter.tracked(), 3);
        assert!(limiter.backoff_remaining(&target, now).is_some());
    }
}
