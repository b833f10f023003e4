//! The sender thread: waits until a batch is due, posts it to `/api/v2/write`, and
//! decides from the response whether to commit, split, drop or retry it.

use std::io::Write as _;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;

use super::{Batch, InfluxDb2Config, Shared, commit_batch, next_batch};

/// Wait of the idle sender between checks; writes wake it earlier.
const IDLE_WAIT: Duration = Duration::from_secs(60);
/// Minimum time between two log lines about the same ongoing failure.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The outcome of one write request.
enum SendOutcome {
    Accepted,
    /// InfluxDB rejected the lines themselves (400, 413, 422); resending them unchanged
    /// cannot succeed.
    Rejected(String),
    /// 401, 403 or 404: a wrong token, org or bucket. Retrying succeeds only after an
    /// operator fixes the config or InfluxDB.
    Credentials(u16, String),
    /// A transport error, a timeout, 429 or 5xx; the batch is retried.
    Retry(String),
}

/// Narrower batches that isolate the invalid lines of a rejected batch.
struct Split {
    max_lines: u64,
    /// The buffer's `removed` count at the end of the rejected batch; past it, batches
    /// return to `batch_size`.
    end_position: u64,
}

/// State of the current failure, for logging each failure kind once and then at most
/// every `REPEAT_LOG_INTERVAL`.
#[derive(Default)]
struct Failure {
    since: Option<Instant>,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl Failure {
    /// Records a failure. Returns whether it starts a new failure, and the number of
    /// failures suppressed since the previous log line when this one should be logged.
    fn record(&mut self) -> (bool, Option<u64>) {
        let first = self.since.is_none();
        self.since.get_or_insert_with(Instant::now);
        let due = self
            .last_log
            .is_none_or(|at| at.elapsed() >= REPEAT_LOG_INTERVAL);
        if due {
            self.last_log = Some(Instant::now());
            let suppressed = std::mem::take(&mut self.suppressed);
            (first, Some(suppressed))
        } else {
            self.suppressed += 1;
            (first, None)
        }
    }
}

pub(super) fn run(shared: &Shared) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "influxdb2 sender could not start its runtime; points stay in the buffer");
            return;
        }
    };
    let client = match reqwest::Client::builder()
        .timeout(shared.config.request_timeout)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "influxdb2 sender could not build its HTTP client; points stay in the buffer");
            return;
        }
    };
    let token = shared.config.resolve_token();
    // Outages and credential failures are logged separately, so one does not hide the
    // other's first log line.
    let mut unreachable = Failure::default();
    let mut credentials = Failure::default();
    runtime.block_on(check_health(&client, shared, &mut unreachable));

    let mut backoff = shared.config.retry_initial_backoff;
    let mut split: Option<Split> = None;
    loop {
        if !wait_until_due(shared) {
            return;
        }
        let max_lines = split
            .as_ref()
            .map_or(shared.config.batch_size as u64, |s| s.max_lines);
        let batch = match next_batch(shared, max_lines) {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                // Pending lines that no batch covers cannot occur; waiting avoids a busy
                // loop if they do.
                if !sleep(shared, shared.config.flush_interval) {
                    return;
                }
                continue;
            }
            Err(error) => {
                tracing::error!(%error, "influxdb2 buffer read failed; retrying");
                if !sleep(shared, backoff) {
                    return;
                }
                continue;
            }
        };

        let outcome = runtime.block_on(send(
            &client,
            &shared.config,
            token.as_deref(),
            &batch.bytes,
        ));
        let failed = match outcome {
            SendOutcome::Accepted => {
                shared.metrics.sent_points.inc_by(batch.lines);
                shared.metrics.up.set(1);
                let removed = commit_batch(shared, &batch);
                if split.as_ref().is_some_and(|s| removed >= s.end_position) {
                    split = None;
                }
                if let Some(since) = unreachable.since.or(credentials.since) {
                    tracing::info!(
                        url = %shared.config.redacted_url(),
                        outage = ?since.elapsed(),
                        "InfluxDB accepts writes again; sending the buffered points"
                    );
                }
                unreachable = Failure::default();
                credentials = Failure::default();
                backoff = shared.config.retry_initial_backoff;
                false
            }
            SendOutcome::Rejected(message) => {
                shared.metrics.up.set(1);
                split = reject(shared, &batch, split, &message);
                false
            }
            SendOutcome::Credentials(status, message) => {
                shared.metrics.up.set(0);
                shared.metrics.failed_requests.inc();
                shared.metrics.rejected_credentials.inc();
                log_rejected_credentials(shared, &mut credentials, status, &message);
                true
            }
            SendOutcome::Retry(message) => {
                shared.metrics.up.set(0);
                shared.metrics.failed_requests.inc();
                log_unreachable(shared, &mut unreachable, &message, backoff);
                true
            }
        };

        if failed {
            if !sleep(shared, backoff) {
                return;
            }
            backoff = (backoff * 2).min(shared.config.retry_max_backoff);
        }
    }
}

/// Handles a batch InfluxDB rejected as invalid. A batch of several lines is resent in
/// halves until each invalid line is alone, so valid lines are not lost with it. A single
/// rejected line is dropped and counted.
fn reject(shared: &Shared, batch: &Batch, split: Option<Split>, message: &str) -> Option<Split> {
    if batch.lines > 1 {
        let max_lines = (batch.lines / 2).max(1);
        tracing::warn!(
            lines = batch.lines,
            retry_lines = max_lines,
            error = %message,
            "InfluxDB rejected a batch as invalid; resending it in smaller batches to find the invalid lines"
        );
        let end_position = split.map_or(batch.end_position, |s| {
            s.end_position.max(batch.end_position)
        });
        return Some(Split {
            max_lines,
            end_position,
        });
    }
    let line = String::from_utf8_lossy(&batch.bytes);
    tracing::error!(
        line = %line.trim_end().chars().take(300).collect::<String>(),
        error = %message,
        "InfluxDB rejected a line as invalid; dropped it"
    );
    shared.metrics.dropped_points.inc();
    let removed = commit_batch(shared, batch);
    split.filter(|s| removed < s.end_position)
}

fn log_rejected_credentials(shared: &Shared, failure: &mut Failure, status: u16, message: &str) {
    let (_, Some(suppressed)) = failure.record() else {
        return;
    };
    tracing::error!(
        org = %shared.config.org,
        bucket = %shared.config.bucket,
        status,
        error = %message,
        suppressed,
        buffered_bytes = super::buffered_bytes(&shared.lock()),
        "InfluxDB rejected the token, org or bucket; points stay buffered on disk and are \
         retried; check storage.influxdb2.token (or token_env), org and bucket"
    );
}

fn log_unreachable(shared: &Shared, failure: &mut Failure, message: &str, backoff: Duration) {
    let (first, log) = failure.record();
    let Some(suppressed) = log else {
        return;
    };
    let buffered_bytes = super::buffered_bytes(&shared.lock());
    let url = shared.config.redacted_url();
    if first {
        tracing::error!(
            %url,
            error = %message,
            buffered_bytes,
            "InfluxDB is unreachable; points are buffered on disk and sent when it answers"
        );
    } else {
        tracing::warn!(
            %url,
            error = %message,
            buffered_bytes,
            suppressed,
            retry_in = ?backoff,
            "InfluxDB is still unreachable; points stay buffered on disk"
        );
    }
}

/// Checks `GET /health` once at start and logs the result. Writes are buffered either way.
async fn check_health(client: &reqwest::Client, shared: &Shared, failure: &mut Failure) {
    let url = shared.config.endpoint("/health");
    let result = match client.get(&url).send().await {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("/health returned {}", response.status())),
        Err(error) => Err(error.without_url().to_string()),
    };
    match result {
        Ok(()) => {
            shared.metrics.up.set(1);
            tracing::info!(url = %shared.config.redacted_url(), "InfluxDB health check succeeded");
        }
        Err(message) => {
            shared.metrics.up.set(0);
            log_unreachable(
                shared,
                failure,
                &message,
                shared.config.retry_initial_backoff,
            );
        }
    }
}

/// Waits until a batch is due: `batch_size` lines are pending, or the oldest pending
/// point has waited `flush_interval`. Returns false when the store is stopping.
fn wait_until_due(shared: &Shared) -> bool {
    let batch_size = shared.config.batch_size as u64;
    let mut state = shared.lock();
    loop {
        if state.stopping {
            return false;
        }
        let timeout = match state.oldest_pending_age() {
            None => IDLE_WAIT,
            Some(_) if state.pending_lines() >= batch_size => return true,
            Some(age) if age >= shared.config.flush_interval => return true,
            Some(age) => shared.config.flush_interval - age,
        };
        state = shared
            .wake
            .wait_timeout(state, timeout)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

/// Sleeps for `duration`, ignoring wakes from writes; returns false when the store is
/// stopping.
fn sleep(shared: &Shared, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    let mut state = shared.lock();
    loop {
        if state.stopping {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        state = shared
            .wake
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

async fn send(
    client: &reqwest::Client,
    config: &InfluxDb2Config,
    token: Option<&str>,
    lines: &[u8],
) -> SendOutcome {
    let mut request = client
        .post(config.endpoint("/api/v2/write"))
        .query(&[
            ("org", config.org.as_str()),
            ("bucket", config.bucket.as_str()),
            ("precision", "ms"),
        ])
        .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    if let Some(token) = token {
        match HeaderValue::from_str(&format!("Token {token}")) {
            Ok(mut value) => {
                value.set_sensitive(true);
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            Err(_) => {
                return SendOutcome::Credentials(
                    401,
                    "the token contains characters an HTTP header cannot carry".into(),
                );
            }
        }
    }
    request = if config.gzip {
        match gzip(lines) {
            Ok(body) => request
                .header(reqwest::header::CONTENT_ENCODING, "gzip")
                .body(body),
            Err(error) => return SendOutcome::Retry(format!("gzip failed: {error}")),
        }
    } else {
        request.body(lines.to_vec())
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            return SendOutcome::Retry(format!("request failed: {}", error.without_url()));
        }
    };
    let status = response.status();
    if status.is_success() {
        return SendOutcome::Accepted;
    }
    let body = response.text().await.unwrap_or_default();
    let message = format!(
        "InfluxDB returned {status}: {}",
        body.chars().take(300).collect::<String>()
    );
    match status.as_u16() {
        400 | 413 | 422 => SendOutcome::Rejected(message),
        code @ (401 | 403 | 404) => SendOutcome::Credentials(code, message),
        _ => SendOutcome::Retry(message),
    }
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes)?;
    encoder.finish()
}
