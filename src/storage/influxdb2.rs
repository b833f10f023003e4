//! InfluxDB 2 storage backend: points are appended as line protocol to an on-disk buffer,
//! and a sender thread posts them in order to InfluxDB's `/api/v2/write`, in gzip batches,
//! retrying with backoff while InfluxDB is unreachable.
//!
//! Durability: `write` returns after the lines are appended and synced to the buffer, so a
//! point survives both an InfluxDB outage and a restart of Stonelion. The buffer is bounded
//! by `buffer_max_bytes`; when it is full, the oldest segment is dropped, counted and
//! logged. Queries are not served here: Grafana reads InfluxDB through its own InfluxQL API.
//!
//! [`TeeStore`] writes to two stores, for the `both` mode (embedded store and InfluxDB).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use influxdb_line_protocol::LineProtocolBuilder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;

use super::{Point, Query, Selector, SeriesData, SeriesKey, StorageError, TimeSeriesStore};
use crate::metrics::SharedRegistry;
use crate::model::{Timestamp, Value};

/// Settings of the InfluxDB 2 backend.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InfluxDb2Config {
    /// Base URL of InfluxDB, such as `http://127.0.0.1:8086`. A path is kept, so InfluxDB
    /// behind a reverse proxy at `https://host/influx` works.
    pub url: String,
    /// Organization name that owns the bucket.
    pub org: String,
    /// Bucket that receives the points.
    pub bucket: String,
    /// API token. Prefer `token_env`, so the token stays out of the config file.
    #[serde(default)]
    pub token: Option<String>,
    /// Environment variable that contains the API token; read when `token` is not set.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Folder of the on-disk buffer; one folder per backend instance. Default:
    /// `influxdb2-buffer` in the data directory.
    #[serde(default)]
    pub buffer_dir: PathBuf,
    /// Maximum size of the on-disk buffer in bytes; when full, the oldest points are dropped.
    #[serde(default = "default_buffer_max_bytes")]
    pub buffer_max_bytes: u64,
    /// Maximum number of lines per write request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Maximum time a point waits in the buffer before it is sent, for example `1s`.
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Timeout of one HTTP request, for example `10s`.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First wait after a failed request; doubled after each failure, for example `500ms`.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    /// Maximum wait between retries, for example `30s`.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Whether request bodies are gzip-compressed.
    #[serde(default = "default_gzip")]
    pub gzip: bool,
}

fn default_token_env() -> String {
    "STONELION_INFLUXDB_TOKEN".to_owned()
}
fn default_buffer_max_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_batch_size() -> usize {
    5_000
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}
fn default_gzip() -> bool {
    true
}

/// Size at which the buffer starts a new segment file.
const SEGMENT_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// Errors of the InfluxDB 2 backend's configuration and start.
#[derive(Debug, thiserror::Error)]
pub enum InfluxDb2Error {
    #[error("invalid storage.influxdb2.{key}: {message}")]
    InvalidConfig { key: &'static str, message: String },
    #[error(
        "InfluxDB health check at {url} failed: {message}; check storage.influxdb2.url and \
         that InfluxDB is running"
    )]
    Unhealthy { url: String, message: String },
    #[error("influxdb2 buffer in {path} failed: {source}")]
    Buffer {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl InfluxDb2Config {
    /// Checks every setting, naming the key and the fix.
    pub fn validate(&self) -> Result<(), InfluxDb2Error> {
        let invalid = |key, message: &str| InfluxDb2Error::InvalidConfig {
            key,
            message: message.to_owned(),
        };
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| invalid("url", &format!("{:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("url", "use an http:// or https:// URL"));
        }
        if self.org.is_empty() {
            return Err(invalid("org", "set the organization name"));
        }
        if self.bucket.is_empty() {
            return Err(invalid("bucket", "set the bucket name"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.buffer_max_bytes < 2 * SEGMENT_MAX_BYTES {
            return Err(invalid(
                "buffer_max_bytes",
                "must be at least 16 MiB (two segments)",
            ));
        }
        if self.flush_interval.is_zero() || self.retry_initial_backoff.is_zero() {
            return Err(invalid(
                "flush_interval",
                "flush_interval and retry_initial_backoff must be above zero",
            ));
        }
        if self.retry_max_backoff < self.retry_initial_backoff {
            return Err(invalid(
                "retry_max_backoff",
                "must not be below retry_initial_backoff",
            ));
        }
        Ok(())
    }

    /// Returns the token from `token`, or else from the `token_env` variable.
    fn resolve_token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| std::env::var(&self.token_env).ok())
            .filter(|t| !t.is_empty())
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

/// Metrics of the InfluxDB 2 backend.
#[derive(Clone, Default)]
struct Influxdb2Metrics {
    buffer_bytes: Gauge,
    sent_points: Counter,
    dropped_points: Counter,
    failed_requests: Counter,
}

impl Influxdb2Metrics {
    fn register(&self, registry: &SharedRegistry) {
        registry.register(|r| {
            let r = r.sub_registry_with_prefix("influxdb2");
            r.register(
                "buffer_bytes",
                "Bytes of line protocol waiting in the on-disk buffer",
                self.buffer_bytes.clone(),
            );
            r.register(
                "sent_points",
                "Points InfluxDB accepted",
                self.sent_points.clone(),
            );
            r.register(
                "dropped_points",
                "Points dropped because the buffer was full or InfluxDB rejected them as invalid",
                self.dropped_points.clone(),
            );
            r.register(
                "failed_requests",
                "Write requests that failed and were retried",
                self.failed_requests.clone(),
            );
        });
    }
}

/// One segment file of the buffer.
#[derive(Debug)]
struct Segment {
    sequence: u64,
    path: PathBuf,
    bytes: u64,
    lines: u64,
}

/// The buffer's state, shared by writers and the sender thread.
#[derive(Debug)]
struct BufferState {
    segments: VecDeque<Segment>,
    /// Bytes of the first segment already delivered.
    cursor: u64,
    /// File of the last segment, open for appending.
    writer: Option<File>,
    stopping: bool,
}

struct Shared {
    dir: PathBuf,
    config: InfluxDb2Config,
    state: Mutex<BufferState>,
    wake: Condvar,
    metrics: Influxdb2Metrics,
}

/// A [`TimeSeriesStore`] that forwards every point to InfluxDB 2.
pub struct InfluxDb2Store {
    shared: Arc<Shared>,
    sender: Option<std::thread::JoinHandle<()>>,
}

impl InfluxDb2Store {
    /// Validates the config, checks InfluxDB's `/health`, reopens the buffer (resuming
    /// delivery of points left from an earlier run) and starts the sender thread.
    pub async fn open(
        config: InfluxDb2Config,
        registry: &SharedRegistry,
    ) -> Result<InfluxDb2Store, InfluxDb2Error> {
        config.validate()?;
        check_health(&config).await?;
        let dir = config.buffer_dir.clone();
        let buffer_path = dir.clone();
        let buffer_error = |source| InfluxDb2Error::Buffer {
            path: buffer_path.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(buffer_error)?;
        let state = load_buffer(&dir).map_err(buffer_error)?;
        let metrics = Influxdb2Metrics::default();
        metrics.register(registry);
        metrics.buffer_bytes.set(i64::try_from(buffered_bytes(&state)).unwrap_or(i64::MAX));
        let pending: u64 = state.segments.iter().map(|s| s.lines).sum();
        tracing::info!(url = %config.url, bucket = %config.bucket, pending_lines = pending, "influxdb2 backend started");
        let shared = Arc::new(Shared {
            dir,
            config,
            state: Mutex::new(state),
            wake: Condvar::new(),
            metrics,
        });
        let sender_shared = Arc::clone(&shared);
        let sender = std::thread::Builder::new()
            .name("influxdb2-sender".into())
            .spawn(move || run_sender(&sender_shared))
            .map_err(buffer_error)?;
        Ok(InfluxDb2Store {
            shared,
            sender: Some(sender),
        })
    }

    /// Number of bytes not yet accepted by InfluxDB.
    pub fn pending_bytes(&self) -> u64 {
        buffered_bytes(&self.shared.lock())
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BufferState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for InfluxDb2Store {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}

async fn check_health(config: &InfluxDb2Config) -> Result<(), InfluxDb2Error> {
    let url = config.endpoint("/health");
    let unhealthy = |message: String| InfluxDb2Error::Unhealthy {
        url: url.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .build()
        .map_err(|e| unhealthy(e.to_string()))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unhealthy(e.to_string()))?;
    if !response.status().is_success() {
        return Err(unhealthy(format!("status {}", response.status())));
    }
    Ok(())
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("segment-{sequence:020}.lp"))
}

/// Reads the segments and the delivery cursor left by an earlier run.
fn load_buffer(dir: &Path) -> std::io::Result<BufferState> {
    let mut sequences: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.strip_prefix("segment-")?
                .strip_suffix(".lp")?
                .parse()
                .ok()
        })
        .collect();
    sequences.sort_unstable();
    let mut segments = VecDeque::new();
    for sequence in sequences {
        let path = segment_path(dir, sequence);
        let content = fs::read(&path)?;
        let lines = content.iter().filter(|&&b| b == b'\n').count() as u64;
        segments.push_back(Segment {
            sequence,
            path,
            bytes: content.len() as u64,
            lines,
        });
    }
    let cursor = match fs::read_to_string(dir.join("cursor")) {
        Ok(text) => parse_cursor(&text, segments.front()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    Ok(BufferState {
        segments,
        cursor,
        writer: None,
        stopping: false,
    })
}

/// Parses the cursor file, `sequence offset`. An offset for another segment is stale.
fn parse_cursor(text: &str, first: Option<&Segment>) -> u64 {
    let mut parts = text.split_whitespace();
    let sequence: Option<u64> = parts.next().and_then(|s| s.parse().ok());
    let offset: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    match first {
        Some(segment) if Some(segment.sequence) == sequence => offset.min(segment.bytes),
        _ => 0,
    }
}

fn buffered_bytes(state: &BufferState) -> u64 {
    state
        .segments
        .iter()
        .map(|s| s.bytes)
        .sum::<u64>()
        .saturating_sub(state.cursor)
}

/// Encodes points as line protocol with millisecond timestamps, one line per point.
/// Non-finite numbers cannot be written and are left out; the count is returned.
fn encode(points: &[Point]) -> (Vec<u8>, u64, u64) {
    let mut builder = LineProtocolBuilder::new_with(Vec::with_capacity(points.len() * 80));
    let mut lines = 0;
    let mut skipped = 0;
    for point in points {
        let key = &point.series;
        let finite = !matches!(point.value, Value::Number(n) if !n.is_finite());
        if !finite || key.measurement.is_empty() || key.field.is_empty() {
            skipped += 1;
            continue;
        }
        let mut line = builder.measurement(&key.measurement);
        for (tag, value) in key
            .tags
            .iter()
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        {
            line = line.tag(tag, value);
        }
        let line = match point.value {
            Value::Bool(b) => line.field(&key.field, b),
            Value::Number(n) => line.field(&key.field, n),
        };
        builder = line.timestamp(point.ts.as_millis()).close_line();
        lines += 1;
    }
    (builder.build(), lines, skipped)
}

impl TimeSeriesStore for InfluxDb2Store {
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError> {
        let (bytes, lines, skipped) = encode(&points);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "influxdb2 backend left out points with non-finite values or empty names"
            );
            self.shared.metrics.dropped_points.inc_by(skipped);
        }
        if lines == 0 {
            return Ok(());
        }
        let mut state = self.shared.lock();
        if state.stopping {
            return Err(StorageError::Closed);
        }
        append(&self.shared, &mut state, &bytes, lines)?;
        self.shared
            .metrics
            .buffer_bytes
            .set(i64::try_from(buffered_bytes(&state)).unwrap_or(i64::MAX));
        drop(state);
        self.shared.wake.notify_all();
        Ok(())
    }

    fn query(&self, _query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        Err(StorageError::InvalidQuery(
            "the influxdb2 backend does not serve queries; query InfluxDB itself, for example \
             with Grafana's InfluxDB data source"
                .into(),
        ))
    }

    fn series(&self, _selector: &Selector) -> Result<Vec<SeriesKey>, StorageError> {
        Err(StorageError::InvalidQuery(
            "the influxdb2 backend does not list series; query InfluxDB itself".into(),
        ))
    }

    /// Returns at once: every `write` has synced its lines to the buffer before returning.
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Returns 0, because the bucket's own retention period deletes old data in InfluxDB.
    fn enforce_retention(&self, _cutoff: Timestamp) -> Result<u64, StorageError> {
        Ok(0)
    }

    fn commit_interval(&self) -> Duration {
        Duration::ZERO
    }
}

/// Appends lines to the last segment and syncs them, starting a new segment when the last
/// one is full and dropping the oldest when the buffer is over its size limit.
fn append(
    shared: &Shared,
    state: &mut BufferState,
    bytes: &[u8],
    lines: u64,
) -> Result<(), StorageError> {
    let needs_segment = state
        .segments
        .back()
        .is_none_or(|s| s.bytes >= SEGMENT_MAX_BYTES)
        || state.writer.is_none();
    if needs_segment {
        let full = state
            .segments
            .back()
            .is_none_or(|s| s.bytes >= SEGMENT_MAX_BYTES);
        if full {
            let sequence = state.segments.back().map_or(0, |s| s.sequence + 1);
            let path = segment_path(&shared.dir, sequence);
            state.segments.push_back(Segment {
                sequence,
                path,
                bytes: 0,
                lines: 0,
            });
        }
        let path = &state.segments.back().expect("a segment exists").path;
        state.writer = Some(OpenOptions::new().create(true).append(true).open(path)?);
    }
    let writer = state.writer.as_mut().expect("writer opened above");
    writer.write_all(bytes)?;
    writer.sync_data()?;
    let last = state.segments.back_mut().expect("a segment exists");
    last.bytes += bytes.len() as u64;
    last.lines += lines;
    enforce_limit(shared, state);
    Ok(())
}

/// Drops the oldest segments while the buffer exceeds `buffer_max_bytes`, keeping the
/// segment being written.
fn enforce_limit(shared: &Shared, state: &mut BufferState) {
    while buffered_bytes(state) > shared.config.buffer_max_bytes && state.segments.len() > 1 {
        let Some(oldest) = state.segments.pop_front() else {
            return;
        };
        state.cursor = 0;
        let _ = fs::remove_file(&oldest.path);
        shared.metrics.dropped_points.inc_by(oldest.lines);
        tracing::error!(
            dropped_lines = oldest.lines,
            max_bytes = shared.config.buffer_max_bytes,
            "influxdb2 buffer is full; dropped its oldest points"
        );
    }
}

/// The next batch to send: up to `batch_size` whole lines of the first segment.
struct Batch {
    sequence: u64,
    start: u64,
    bytes: Vec<u8>,
    lines: u64,
}

fn next_batch(shared: &Shared) -> std::io::Result<Option<Batch>> {
    let state = shared.lock();
    let Some(first) = state.segments.front() else {
        return Ok(None);
    };
    let (sequence, start, end, path) = (
        first.sequence,
        state.cursor,
        first.bytes,
        first.path.clone(),
    );
    drop(state);
    if start >= end {
        return Ok(None);
    }
    let mut file = File::open(&path)?;
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = vec![0; usize::try_from(end - start).unwrap_or(usize::MAX)];
    file.read_exact(&mut bytes)?;
    let mut lines = 0;
    let mut cut = 0;
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b'\n' {
            lines += 1;
            cut = index + 1;
            if lines == shared.config.batch_size as u64 {
                break;
            }
        }
    }
    bytes.truncate(cut);
    Ok(Some(Batch {
        sequence,
        start,
        bytes,
        lines,
    }))
}

/// Marks a batch as delivered: moves the cursor, persists it, and deletes a finished
/// segment unless it is the one being written.
fn commit_batch(shared: &Shared, batch: &Batch) {
    let mut state = shared.lock();
    let matches = state
        .segments
        .front()
        .is_some_and(|s| s.sequence == batch.sequence)
        && state.cursor == batch.start;
    if !matches {
        // The segment was dropped for space while the batch was in flight.
        return;
    }
    state.cursor += batch.bytes.len() as u64;
    let first = state.segments.front().expect("checked above");
    let finished = state.cursor >= first.bytes
        && (state.segments.len() > 1 || first.bytes >= SEGMENT_MAX_BYTES);
    if finished {
        let done = state.segments.pop_front().expect("checked above");
        let _ = fs::remove_file(&done.path);
        state.cursor = 0;
        if state.segments.is_empty() {
            state.writer = None;
        }
    }
    let cursor_text = match state.segments.front() {
        Some(segment) => format!("{} {}", segment.sequence, state.cursor),
        None => String::new(),
    };
    if let Err(error) = fs::write(shared.dir.join("cursor"), cursor_text) {
        // NOTE: without the cursor file, a restart sends this segment's delivered lines
        // again; InfluxDB overwrites a point with the same series and time, so the data
        // stays correct.
        tracing::warn!(%error, "influxdb2 buffer could not save its cursor");
    }
    shared
        .metrics
        .buffer_bytes
        .set(i64::try_from(buffered_bytes(&state)).unwrap_or(i64::MAX));
}

/// The outcome of one write request.
enum SendOutcome {
    Accepted,
    /// InfluxDB rejected the lines themselves (400, 413, 422); retrying cannot succeed.
    Rejected(String),
    /// A transport error, a timeout, 429 or 5xx, or an auth or bucket error that an
    /// operator can fix; the batch is retried.
    Retry(String),
}

fn run_sender(shared: &Shared) {
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
    let mut backoff = shared.config.retry_initial_backoff;
    loop {
        let batch = match next_batch(shared) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, "influxdb2 buffer read failed; retrying");
                None
            }
        };
        let Some(batch) = batch else {
            if !wait(shared, shared.config.flush_interval) {
                return;
            }
            continue;
        };
        match runtime.block_on(send(
            &client,
            &shared.config,
            token.as_deref(),
            &batch.bytes,
        )) {
            SendOutcome::Accepted => {
                shared.metrics.sent_points.inc_by(batch.lines);
                commit_batch(shared, &batch);
                backoff = shared.config.retry_initial_backoff;
            }
            SendOutcome::Rejected(message) => {
                tracing::error!(lines = batch.lines, error = %message, "InfluxDB rejected a batch as invalid; dropped it");
                shared.metrics.dropped_points.inc_by(batch.lines);
                commit_batch(shared, &batch);
            }
            SendOutcome::Retry(message) => {
                shared.metrics.failed_requests.inc();
                tracing::warn!(error = %message, retry_in = ?backoff, "influxdb2 write failed; points stay buffered");
                if !wait(shared, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(shared.config.retry_max_backoff);
            }
        }
    }
}

/// Waits up to `timeout` or until woken; returns false when the store is stopping.
fn wait(shared: &Shared, timeout: Duration) -> bool {
    let state = shared.lock();
    if state.stopping {
        return false;
    }
    let (state, _) = shared
        .wake
        .wait_timeout(state, timeout)
        .unwrap_or_else(PoisonError::into_inner);
    !state.stopping
}

async fn send(
    client: &reqwest::Client,
    config: &InfluxDb2Config,
    token: Option<&str>,
    lines: &[u8],
) -> SendOutcome {
    let url = config.endpoint("/api/v2/write");
    let mut request = client
        .post(&url)
        .query(&[
            ("org", config.org.as_str()),
            ("bucket", config.bucket.as_str()),
            ("precision", "ms"),
        ])
        .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    if let Some(token) = token {
        request = request.header(reqwest::header::AUTHORIZATION, format!("Token {token}"));
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
        Err(error) => return SendOutcome::Retry(format!("request to {url} failed: {error}")),
    };
    let status = response.status();
    if status.is_success() {
        return SendOutcome::Accepted;
    }
    let body = response.text().await.unwrap_or_default();
    let message = format!(
        "{url} returned {status}: {}",
        body.chars().take(300).collect::<String>()
    );
    match status.as_u16() {
        400 | 413 | 422 => SendOutcome::Rejected(message),
        _ => SendOutcome::Retry(message),
    }
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// Writes to two stores and reads from the first, for running the embedded store and
/// InfluxDB 2 side by side.
pub struct TeeStore {
    primary: Arc<dyn TimeSeriesStore>,
    secondary: Arc<dyn TimeSeriesStore>,
}

impl TeeStore {
    /// `primary` serves queries; both receive every write.
    pub fn new(primary: Arc<dyn TimeSeriesStore>, secondary: Arc<dyn TimeSeriesStore>) -> TeeStore {
        TeeStore { primary, secondary }
    }
}

impl TimeSeriesStore for TeeStore {
    /// Writes to the secondary first, so a failure of the primary is still reported after
    /// the secondary has the points, and returns the first error.
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError> {
        let secondary = self.secondary.write(points.clone());
        self.primary.write(points)?;
        secondary
    }

    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        self.primary.query(query)
    }

    fn series(&self, selector: &Selector) -> Result<Vec<SeriesKey>, StorageError> {
        self.primary.series(selector)
    }

    fn flush(&self) -> Result<(), StorageError> {
        let secondary = self.secondary.flush();
        self.primary.flush()?;
        secondary
    }

    fn enforce_retention(&self, cutoff: Timestamp) -> Result<u64, StorageError> {
        self.primary.enforce_retention(cutoff)
    }

    fn commit_interval(&self) -> Duration {
        self.primary
            .commit_interval()
            .max(self.secondary.commit_interval())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InfluxDb2Config {
        toml::from_str(
            r#"
            url = "http://127.0.0.1:8086/influx/"
            org = "plant"
            bucket = "stonelion"
            buffer_dir = "/var/lib/stonelion/influxdb2"
            flush_interval = "250ms"
            "#,
        )
        .expect("config parses")
    }

    #[test]
    fn config_defaults_and_validation() {
        let config = config();
        assert_eq!(config.flush_interval, Duration::from_millis(250));
        assert_eq!(config.batch_size, 5_000);
        assert!(config.validate().is_ok());
        assert_eq!(
            config.endpoint("/api/v2/write"),
            "http://127.0.0.1:8086/influx/api/v2/write"
        );
    }

    #[test]
    fn invalid_url_names_key() {
        let config = InfluxDb2Config {
            url: "not a url".into(),
            ..config()
        };
        let message = config.validate().expect_err("invalid url").to_string();
        assert!(
            message.starts_with("invalid storage.influxdb2.url"),
            "{message}"
        );
    }

    #[test]
    fn unknown_key_rejected() {
        let parsed: Result<InfluxDb2Config, _> = toml::from_str(
            "url = \"http://x\"\norg = \"o\"\nbucket = \"b\"\nbuffer_dir = \"d\"\nbatchsize = 1",
        );
        assert!(parsed.is_err());
    }

    #[test]
    fn encode_writes_line_protocol() {
        let point = Point {
            series: SeriesKey::new(
                "gas-detector",
                vec![("site".into(), "plant a".into())],
                "gas_lel",
            ),
            ts: Timestamp(1_700_000_000_000),
            value: Value::Number(12.5),
        };
        let bad = Point {
            value: Value::Number(f64::NAN),
            ..point.clone()
        };
        let (bytes, lines, skipped) = encode(&[point, bad]);
        assert_eq!(
            String::from_utf8(bytes).expect("utf-8"),
            "gas-detector,site=plant\\ a gas_lel=12.5 1700000000000\n"
        );
        assert_eq!((lines, skipped), (1, 1));
    }
}
