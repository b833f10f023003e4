//! The dispatcher: one task per webhook that sends queued deliveries and retries failures.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use reqwest::header::CONTENT_TYPE;
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::SharedClock;
use crate::metrics::SharedRegistry;
use crate::model::Timestamp;
use crate::notify::config::Webhook;
use crate::notify::metrics::NotifyMetrics;
use crate::notify::outbox::{self, PendingDelivery};
use crate::notify::signature::signature_header;

/// Interval of the fallback scan for rows committed without a [`DispatcherHandle::wake`].
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

/// Wait for SQLite's write lock before a statement fails with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of a non-2xx response body kept in the error message.
const ERROR_BODY_LIMIT: usize = 256;

/// Error that stops the dispatcher from starting.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("failed to open the state database {path}: {source}")]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("failed to build the HTTP client for webhooks: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("webhook name {0:?} is configured twice: give each webhook a unique name")]
    DuplicateName(String),
}

/// Tells the dispatcher that new outbox rows were committed. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct DispatcherHandle {
    wakers: Arc<[Arc<Notify>]>,
}

impl DispatcherHandle {
    /// Starts delivery of rows committed before this call. Call it after every commit that
    /// enqueued rows; a wake with nothing new costs one query per webhook.
    pub fn wake(&self) {
        for waker in self.wakers.iter() {
            waker.notify_one();
        }
    }
}

/// Starts one delivery task per webhook, each with its own connection to the state database
/// at `db_path`, and returns a handle to wake them and a task that ends after `shutdown`
/// is cancelled and every in-flight attempt has finished.
///
/// Creates the outbox table if it does not exist. Must be called inside a tokio runtime.
pub fn spawn_dispatcher(
    db_path: &Path,
    webhooks: Vec<Webhook>,
    clock: &SharedClock,
    registry: &SharedRegistry,
    shutdown: &CancellationToken,
) -> Result<(DispatcherHandle, JoinHandle<()>), DispatcherError> {
    let metrics = registry.register(NotifyMetrics::new);
    spawn_dispatcher_with_metrics(db_path, webhooks, clock, &metrics, shutdown)
}

/// Like [`spawn_dispatcher`], with metrics that are already registered, so that a config
/// reload can replace the dispatcher without registering its metrics twice.
pub fn spawn_dispatcher_with_metrics(
    db_path: &Path,
    webhooks: Vec<Webhook>,
    clock: &SharedClock,
    metrics: &NotifyMetrics,
    shutdown: &CancellationToken,
) -> Result<(DispatcherHandle, JoinHandle<()>), DispatcherError> {
    reject_duplicate_names(&webhooks)?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("stonelion/", env!("CARGO_PKG_VERSION")))
        .build()?;

    let setup = open_database(db_path)?;
    report_orphaned_rows(&setup, &webhooks, clock.now());

    let mut workers = Vec::with_capacity(webhooks.len());
    for webhook in webhooks {
        workers.push(Worker {
            conn: Arc::new(Mutex::new(open_database(db_path)?)),
            client: client.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            wake: Arc::new(Notify::new()),
            shutdown: shutdown.clone(),
            streak: FailureStreak::default(),
            webhook,
        });
    }
    let handle = DispatcherHandle {
        wakers: workers.iter().map(|w| w.wake.clone()).collect(),
    };

    let mut tasks = JoinSet::new();
    for worker in workers {
        tasks.spawn(worker.run());
    }
    let joined = tokio::spawn(async move {
        while let Some(result) = tasks.join_next().await {
            if let Err(e) = result {
                error!(error = %e, "webhook delivery task failed; its deliveries stay queued");
            }
        }
        info!("webhook dispatcher stopped");
    });
    Ok((handle, joined))
}

fn reject_duplicate_names(webhooks: &[Webhook]) -> Result<(), DispatcherError> {
    let mut names = HashSet::new();
    for webhook in webhooks {
        if !names.insert(webhook.name.as_str()) {
            return Err(DispatcherError::DuplicateName(webhook.name.clone()));
        }
    }
    Ok(())
}

fn open_database(path: &Path) -> Result<Connection, DispatcherError> {
    let open = || -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        outbox::init_schema(&conn)?;
        Ok(conn)
    };
    open().map_err(|source| DispatcherError::Database {
        path: path.to_owned(),
        source,
    })
}

/// Logs rows queued for webhook names that are no longer configured, because nothing will
/// send them until the name is configured again.
fn report_orphaned_rows(conn: &Connection, webhooks: &[Webhook], now: Timestamp) {
    let states = match outbox::queue_state(conn, webhooks, now) {
        Ok(states) => states,
        Err(e) => {
            error!(error = %e, "failed to read the webhook outbox at start");
            return;
        }
    };
    for state in states.iter().filter(|s| !s.configured && s.pending > 0) {
        error!(
            webhook = %state.webhook,
            pending = state.pending,
            "outbox contains deliveries for a webhook that is not configured; \
             configure a webhook of that name to send them, or delete its rows from \
             webhook_outbox"
        );
    }
}

/// Consecutive failed attempts of one webhook, for backoff and log levels.
#[derive(Debug, Default)]
struct FailureStreak {
    failures: u32,
    started_at: Option<Timestamp>,
    error_logged: bool,
}

struct Worker {
    webhook: Webhook,
    conn: Arc<Mutex<Connection>>,
    client: reqwest::Client,
    clock: SharedClock,
    metrics: NotifyMetrics,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    streak: FailureStreak,
}

/// A failed database call of a worker.
#[derive(Debug, thiserror::Error)]
enum DbCallError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("database task failed: {0}")]
    Join(#[from] JoinError),
}

impl Worker {
    async fn run(mut self) {
        let pending = self.refresh_queue_metrics().await;
        info!(
            webhook = %self.webhook.name,
            url = %self.webhook.redacted_url(),
            pending,
            "webhook delivery started"
        );

        while !self.shutdown.is_cancelled() {
            let name = self.webhook.name.clone();
            let next = self.with_db(move |c| outbox::next_delivery(c, &name)).await;
            let keep_running = match next {
                Ok(Some(delivery)) => self.deliver(&delivery).await,
                Ok(None) => self.wait_for_rows().await,
                Err(e) => {
                    error!(webhook = %self.webhook.name, error = %e, "failed to read the webhook outbox");
                    self.pause(self.webhook.max_backoff).await
                }
            };
            if !keep_running {
                break;
            }
        }
        info!(webhook = %self.webhook.name, "webhook delivery stopped");
    }

    /// Makes one attempt and stores its outcome; returns false when shutdown was requested
    /// during the backoff that follows a failure.
    async fn deliver(&mut self, delivery: &PendingDelivery) -> bool {
        let label = NotifyMetrics::label(&self.webhook.name);
        if delivery.attempts > 0 {
            self.metrics.retries.get_or_create(&label).inc();
        }

        let result = self.attempt(delivery).await;
        let keep_running = match result {
            Ok(()) => self.on_success(delivery).await,
            Err(reason) => self.on_failure(delivery, reason).await,
        };
        self.refresh_queue_metrics().await;
        keep_running
    }

    async fn attempt(&self, delivery: &PendingDelivery) -> Result<(), String> {
        let signature = signature_header(self.webhook.secret.expose(), &delivery.body);
        let request = self
            .client
            .post(self.webhook.url.clone())
            .timeout(self.webhook.timeout)
            .header(CONTENT_TYPE, "application/json")
            .header("X-Stonelion-Event", &delivery.event)
            .header("X-Stonelion-Delivery", &delivery.delivery_id)
            .header("X-Stonelion-Signature", signature)
            .body(delivery.body.clone());

        let mut response = request.send().await.map_err(|e| self.describe_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }

        // Keep the start of the body: receivers often explain a rejection there.
        let mut body = Vec::new();
        while body.len() < ERROR_BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        body.truncate(ERROR_BODY_LIMIT);
        let body = String::from_utf8_lossy(&body);
        Err(format!("receiver returned {status}: {}", body.trim()))
    }

    /// Describes a request error without its URL, which may contain a token.
    fn describe_error(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            let limit = humantime::format_duration(self.webhook.timeout);
            return format!("request timed out after {limit}");
        }

        let mut text = String::from(if error.is_connect() {
            "connection failed"
        } else {
            "request failed"
        });
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    async fn on_success(&mut self, delivery: &PendingDelivery) -> bool {
        let label = NotifyMetrics::label(&self.webhook.name);
        self.metrics.delivered.get_or_create(&label).inc();
        debug!(
            webhook = %self.webhook.name,
            delivery_id = %delivery.delivery_id,
            event = %delivery.event,
            alarm_id = %delivery.alarm_id,
            "webhook delivered"
        );
        if self.streak.failures > 0 {
            info!(
                webhook = %self.webhook.name,
                failed_attempts = self.streak.failures,
                failing_since = %self.streak.started_at.unwrap_or(self.clock.now()),
                "webhook receiver recovered"
            );
        }
        self.streak = FailureStreak::default();

        let seq = delivery.seq;
        if let Err(e) = self.with_db(move |c| outbox::mark_delivered(c, seq)).await {
            // The row stays, so the receiver gets this delivery again with the same id.
            error!(
                webhook = %self.webhook.name,
                delivery_id = %delivery.delivery_id,
                error = %e,
                "failed to remove a delivered row from the webhook outbox; it will be sent again"
            );
            return self.pause(self.webhook.initial_backoff).await;
        }
        true
    }

    async fn on_failure(&mut self, delivery: &PendingDelivery, reason: String) -> bool {
        let label = NotifyMetrics::label(&self.webhook.name);
        self.metrics.failed_attempts.get_or_create(&label).inc();
        let now = self.clock.now();
        self.log_failure(delivery, &reason, now);

        let seq = delivery.seq;
        let stored_reason = reason.clone();
        let stored = self
            .with_db(move |c| outbox::record_failure(c, seq, now, &stored_reason))
            .await;
        if let Err(e) = stored {
            error!(webhook = %self.webhook.name, error = %e, "failed to record a failed webhook attempt");
        }

        let (delay, capped) = backoff(&self.webhook, self.streak.failures);
        if capped && !self.streak.error_logged {
            self.streak.error_logged = true;
            error!(
                webhook = %self.webhook.name,
                failed_attempts = self.streak.failures,
                retry_every = %humantime::format_duration(self.webhook.max_backoff),
                error = %reason,
                "webhook receiver keeps failing; alarm deliveries are queued and retried \
                 until it returns 2xx; check the receiver"
            );
        }
        self.pause(delay).await
    }

    fn log_failure(&mut self, delivery: &PendingDelivery, reason: &str, now: Timestamp) {
        self.streak.failures += 1;
        if self.streak.failures == 1 {
            self.streak.started_at = Some(now);
            warn!(
                webhook = %self.webhook.name,
                delivery_id = %delivery.delivery_id,
                event = %delivery.event,
                alarm_id = %delivery.alarm_id,
                error = %reason,
                "webhook delivery failed; retrying with backoff"
            );
        } else {
            debug!(
                webhook = %self.webhook.name,
                delivery_id = %delivery.delivery_id,
                failed_attempts = self.streak.failures,
                error = %reason,
                "webhook delivery failed again"
            );
        }
    }

    /// Updates the queue gauges and returns the number of waiting rows.
    async fn refresh_queue_metrics(&self) -> u64 {
        let name = self.webhook.name.clone();
        let summary = self
            .with_db(move |c| outbox::pending_summary(c, &name))
            .await;
        let (pending, oldest) = match summary {
            Ok(summary) => summary,
            Err(e) => {
                debug!(webhook = %self.webhook.name, error = %e, "failed to count the webhook outbox");
                return 0;
            }
        };

        let label = NotifyMetrics::label(&self.webhook.name);
        let age_seconds = oldest.map_or(0, |t| (self.clock.now().0 - t.0).max(0) / 1000);
        self.metrics
            .queue_depth
            .get_or_create(&label)
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.metrics
            .oldest_pending_seconds
            .get_or_create(&label)
            .set(age_seconds);
        pending
    }

    /// Waits for a wake, the fallback scan or shutdown; returns false on shutdown.
    async fn wait_for_rows(&self) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = self.wake.notified() => true,
            () = tokio::time::sleep(RESCAN_INTERVAL) => true,
        }
    }

    /// Sleeps for `delay` unless shutdown comes first; returns false on shutdown.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Runs a database call on the blocking pool, so a busy database does not stall the runtime.
    async fn with_db<T, F>(&self, call: F) -> Result<T, DbCallError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            call(&conn)
        })
        .await?;
        Ok(result?)
    }
}

/// Returns the wait after the `failures`-th consecutive failure and whether the cap was hit.
///
/// The wait doubles from `initial_backoff` up to `max_backoff`. The delay is drawn between
/// half and all of that wait, so a receiver that comes back is not hit by every retry at once.
fn backoff(webhook: &Webhook, failures: u32) -> (Duration, bool) {
    let doublings = failures.saturating_sub(1).min(31);
    let uncapped = webhook.initial_backoff.saturating_mul(1 << doublings);
    let capped = uncapped >= webhook.max_backoff;
    let base = uncapped.min(webhook.max_backoff);

    let half = base / 2;
    let jitter = rand::rng().random_range(Duration::ZERO..=half);
    (half + jitter, capped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::config::Secret;

    fn webhook(initial_ms: u64, max_ms: u64) -> Webhook {
        Webhook {
            name: "a".into(),
            url: reqwest::Url::parse("http://127.0.0.1/").expect("valid URL"),
            secret: Secret::new("s"),
            timeout: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            events: None,
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_until_cap() {
        let webhook = webhook(100, 1000);

        for (failures, base_ms, capped) in [
            (1, 100, false),
            (2, 200, false),
            (4, 800, false),
            (5, 1000, true),
            (60, 1000, true),
        ] {
            for _ in 0..50 {
                let (delay, hit_cap) = backoff(&webhook, failures);
                assert!(
                    delay >= Duration::from_millis(base_ms / 2),
                    "{failures}: {delay:?}"
                );
                assert!(
                    delay <= Duration::from_millis(base_ms),
                    "{failures}: {delay:?}"
                );
                assert_eq!(hit_cap, capped, "failures {failures}");
            }
        }
    }
}
