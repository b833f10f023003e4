//! InfluxDB 2 storage backend: points are appended as line protocol to an on-disk buffer,
//! and a sender thread posts them in order to InfluxDB's `/api/v2/write`, in gzip batches,
//! retrying with backoff while InfluxDB is unreachable or rejects the credentials.
//!
//! Durability: `write` returns after the lines are appended and synced to the buffer, so a
//! point survives both an InfluxDB outage and a restart of Stonelion. The backend starts
//! while InfluxDB is down and delivers the buffer once InfluxDB accepts writes. The buffer is bounded
//! by `buffer_max_bytes`; when it is full, the oldest segment is dropped, counted and
//! logged. Queries are not served here: Grafana reads InfluxDB through its own InfluxQL API.
//!
//! [`TeeStore`] writes to two stores, for the `both` mode (embedded store and InfluxDB).

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use influxdb_line_protocol::LineProtocolBuilder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;

use super::{Point, Query, Selector, SeriesData, SeriesKey, StorageError, TimeSeriesStore};
use crate::metrics::SharedRegistry;
use crate::model::{Timestamp, Value};

mod sender;

/// Settings of the InfluxDB 2 backend.
#[derive(Clone, Deserialize, PartialEq)]
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
    /// Maximum size of the on-disk buffer in bytes, at least 64 KiB; when full, the oldest
    /// points are dropped, one eighth of the buffer (at most 8 MiB) at a time.
    #[serde(default = "default_buffer_max_bytes")]
    pub buffer_max_bytes: u64,
    /// Maximum number of lines per write request. A batch is sent as soon as it has this
    /// many lines.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Maximum time a point waits in the buffer before it is sent while InfluxDB accepts
    /// writes, for example `1s`. A batch is sent when it reaches `batch_size` lines or when
    /// its oldest point has waited this long, whichever comes first.
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

/// Prints `<redacted>` in place of the token, so a logged config never shows it.
impl fmt::Debug for InfluxDb2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InfluxDb2Config")
            .field("url", &self.url)
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .field("buffer_dir", &self.buffer_dir)
            .field("buffer_max_bytes", &self.buffer_max_bytes)
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("request_timeout", &self.request_timeout)
            .field("retry_initial_backoff", &self.retry_initial_backoff)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("gzip", &self.gzip)
            .finish()
    }
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

/// Maximum size of one segment file of the buffer.
const SEGMENT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Smallest allowed `buffer_max_bytes`.
const BUFFER_MIN_BYTES: u64 = 64 * 1024;
/// Minimum number of segments in a full buffer, so dropping the oldest segment drops at
/// most one eighth of the buffer.
const SEGMENTS_PER_BUFFER: u64 = 8;
/// Maximum number of append times kept for the `flush_interval` deadline. Beyond it, new
/// appends share the newest entry, so they may be sent early but never late.
const MAX_APPEND_MARKS: usize = 4096;

/// Size at which the buffer starts a new segment file.
fn segment_max_bytes(buffer_max_bytes: u64) -> u64 {
    (buffer_max_bytes / SEGMENTS_PER_BUFFER).clamp(1, SEGMENT_MAX_BYTES)
}

/// Errors of the InfluxDB 2 backend's configuration and start.
#[derive(Debug, thiserror::Error)]
pub enum InfluxDb2Error {
    #[error("invalid storage.influxdb2.{key}: {message}")]
    InvalidConfig { key: &'static str, message: String },
    #[error(
        "cannot use the InfluxDB 2 buffer folder {path}: {source}; check \
         storage.influxdb2.buffer_dir and the folder's permissions"
    )]
    Buffer {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl InfluxDb2Config {
    /// Checks every setting, naming the key and the fix. The token must be set, in `token`
    /// or in the variable named by `token_env`.
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
        if self.resolve_token().is_none() {
            return Err(invalid(
                "token",
                &format!(
                    "missing API token; set the environment variable {} (named by \
                     storage.influxdb2.token_env) or storage.influxdb2.token",
                    self.token_env
                ),
            ));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.buffer_max_bytes < BUFFER_MIN_BYTES {
            return Err(invalid(
                "buffer_max_bytes",
                "must be at least 65536 (64 KiB)",
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

    /// Returns the URL without path and query, for logs.
    fn redacted_url(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(url) => match (url.host_str(), url.port()) {
                (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
                (Some(host), None) => format!("{}://{host}", url.scheme()),
                (None, _) => format!("{}://", url.scheme()),
            },
            Err(_) => "<invalid URL>".to_owned(),
        }
    }
}

/// Metrics of the InfluxDB 2 backend.
#[derive(Clone, Default)]
struct Influxdb2Metrics {
    buffer_bytes: Gauge,
    sent_points: Counter,
    dropped_points: Counter,
    failed_requests: Counter,
    rejected_credentials: Counter,
    up: Gauge,
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
                "Write requests that failed and were retried, including credential failures",
                self.failed_requests.clone(),
            );
            r.register(
                "rejected_credentials",
                "Write requests rejected with 401, 403 or 404: a wrong token, org or bucket; \
                 the points stay buffered",
                self.rejected_credentials.clone(),
            );
            r.register(
                "up",
                "1 when InfluxDB accepted the last request, 0 while it is unreachable or \
                 rejects the writes",
                self.up.clone(),
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
    /// Lines of the first segment already delivered.
    cursor_lines: u64,
    /// File of the last segment, open for appending.
    writer: Option<File>,
    /// Bytes added to the buffer since open, counting the pending bytes found at open.
    appended: u64,
    /// Bytes removed from the buffer since open, delivered or dropped.
    removed: u64,
    /// Append times of pending bytes, oldest first: the value of `appended` after the
    /// append, and when it happened.
    marks: VecDeque<(u64, Instant)>,
    stopping: bool,
}

impl BufferState {
    fn pending_lines(&self) -> u64 {
        let lines: u64 = self.segments.iter().map(|s| s.lines).sum();
        lines.saturating_sub(self.cursor_lines)
    }

    /// Time since the oldest pending point was appended, or `None` when nothing is pending.
    fn oldest_pending_age(&self) -> Option<Duration> {
        if self.pending_lines() == 0 {
            return None;
        }
        Some(
            self.marks
                .front()
                .map_or(Duration::MAX, |(_, at)| at.elapsed()),
        )
    }

    /// Records that `bytes` left the buffer, delivered or dropped.
    fn remove_pending(&mut self, bytes: u64) {
        self.removed += bytes;
        while self
            .marks
            .front()
            .is_some_and(|(end, _)| *end <= self.removed)
        {
            self.marks.pop_front();
        }
    }
}

struct Shared {
    dir: PathBuf,
    config: InfluxDb2Config,
    segment_max_bytes: u64,
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
    /// Validates the config, reopens the buffer (resuming delivery of points left from an
    /// earlier run) and starts the sender thread. It does not wait for InfluxDB: the sender
    /// checks `/health` in the background and logs at ERROR when InfluxDB is unreachable,
    /// while writes go to the buffer. Only an invalid config or an unusable buffer folder
    /// fails.
    pub fn open(
        config: InfluxDb2Config,
        registry: &SharedRegistry,
    ) -> Result<InfluxDb2Store, InfluxDb2Error> {
        config.validate()?;
        let dir = config.buffer_dir.clone();
        let buffer_path = dir.clone();
        let buffer_error = |source| InfluxDb2Error::Buffer {
            path: buffer_path.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(buffer_error)?;
        let state = load_buffer(&dir, config.flush_interval).map_err(buffer_error)?;
        let metrics = Influxdb2Metrics::default();
        metrics.register(registry);
        metrics
            .buffer_bytes
            .set(gauge_value(buffered_bytes(&state)));
        tracing::info!(
            url = %config.redacted_url(),
            org = %config.org,
            bucket = %config.bucket,
            pending_lines = state.pending_lines(),
            "influxdb2 backend started"
        );
        let shared = Arc::new(Shared {
            dir,
            segment_max_bytes: segment_max_bytes(config.buffer_max_bytes),
            config,
            state: Mutex::new(state),
            wake: Condvar::new(),
            metrics,
        });
        let sender_shared = Arc::clone(&shared);
        let sender = std::thread::Builder::new()
            .name("influxdb2-sender".into())
            .spawn(move || sender::run(&sender_shared))
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

    fn update_buffer_gauge(&self, state: &BufferState) {
        self.metrics
            .buffer_bytes
            .set(gauge_value(buffered_bytes(state)));
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
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

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("segment-{sequence:020}.lp"))
}

/// Reads the segments and the delivery cursor left by an earlier run. A segment that ends
/// in a partly written line (a crash during an append, which `write` never acknowledged)
/// is cut back to its last whole line. Points found pending count as due at once.
fn load_buffer(dir: &Path, flush_interval: Duration) -> std::io::Result<BufferState> {
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
    let mut first_content = Vec::new();
    for sequence in sequences {
        let path = segment_path(dir, sequence);
        let mut content = fs::read(&path)?;
        cut_torn_line(&path, &mut content)?;
        let lines = content.iter().filter(|&&b| b == b'\n').count() as u64;
        if segments.is_empty() {
            first_content = content.clone();
        }
        segments.push_back(Segment {
            sequence,
            path,
            bytes: content.len() as u64,
            lines,
        });
    }
    let mut cursor = match fs::read_to_string(dir.join("cursor")) {
        Ok(text) => parse_cursor(&text, segments.front()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    // A delivered first segment is kept only while it is the one being written.
    if segments.len() > 1 && segments.front().is_some_and(|s| cursor >= s.bytes) {
        if let Some(done) = segments.pop_front() {
            fs::remove_file(&done.path)?;
        }
        cursor = 0;
    }
    let delivered = usize::try_from(cursor)
        .unwrap_or(usize::MAX)
        .min(first_content.len());
    let cursor_lines = first_content[..delivered]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64;
    let mut state = BufferState {
        segments,
        cursor,
        cursor_lines,
        writer: None,
        appended: 0,
        removed: 0,
        marks: VecDeque::new(),
        stopping: false,
    };
    state.appended = buffered_bytes(&state);
    if state.appended > 0 {
        let due = Instant::now()
            .checked_sub(flush_interval)
            .unwrap_or_else(Instant::now);
        state.marks.push_back((state.appended, due));
    }
    Ok(state)
}

/// Truncates a segment after its last newline and logs how many bytes were cut.
fn cut_torn_line(path: &Path, content: &mut Vec<u8>) -> std::io::Result<()> {
    let whole = content
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    if whole == content.len() {
        return Ok(());
    }
    let torn_bytes = content.len() - whole;
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(whole as u64)?;
    file.sync_all()?;
    content.truncate(whole);
    tracing::warn!(
        segment = %path.display(),
        torn_bytes,
        "influxdb2 buffer segment ended in a partly written line, left by a crash during a \
         write that was never acknowledged; cut it off"
    );
    Ok(())
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
        let was_idle = state.pending_lines() == 0;
        append(&self.shared, &mut state, &bytes, lines)?;
        self.shared.update_buffer_gauge(&state);
        // The sender waits for a full batch or for the oldest point's deadline, so it
        // needs a wake only when the batch fills or a first point sets a deadline.
        let wake = was_idle || state.pending_lines() >= self.shared.config.batch_size as u64;
        drop(state);
        if wake {
            self.shared.wake.notify_all();
        }
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
    let full = state
        .segments
        .back()
        .is_none_or(|s| s.bytes >= shared.segment_max_bytes);
    if full {
        let sequence = state.segments.back().map_or(0, |s| s.sequence + 1);
        let path = segment_path(&shared.dir, sequence);
        state.segments.push_back(Segment {
            sequence,
            path,
            bytes: 0,
            lines: 0,
        });
        state.writer = None;
    }
    let last = state.segments.back().expect("a segment exists");
    let known_len = last.bytes;
    if state.writer.is_none() {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&last.path)?;
        // Cuts bytes of an earlier append that failed halfway, so every append starts on
        // a line boundary.
        file.set_len(known_len)?;
        state.writer = Some(file);
    }
    let writer = state.writer.as_mut().expect("writer opened above");
    if let Err(error) = writer.write_all(bytes).and_then(|()| writer.sync_data()) {
        // The next append reopens the file and cuts it back to `known_len`.
        state.writer = None;
        return Err(error.into());
    }
    let last = state.segments.back_mut().expect("a segment exists");
    last.bytes += bytes.len() as u64;
    last.lines += lines;
    state.appended += bytes.len() as u64;
    let appended = state.appended;
    let marks_full = state.marks.len() >= MAX_APPEND_MARKS;
    match state.marks.back_mut() {
        Some(newest) if marks_full => newest.0 = appended,
        _ => state.marks.push_back((appended, Instant::now())),
    }
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
        let dropped_bytes = oldest.bytes.saturating_sub(state.cursor);
        let dropped_lines = oldest.lines.saturating_sub(state.cursor_lines);
        state.cursor = 0;
        state.cursor_lines = 0;
        state.remove_pending(dropped_bytes);
        let _ = fs::remove_file(&oldest.path);
        shared.metrics.dropped_points.inc_by(dropped_lines);
        tracing::error!(
            dropped_points = dropped_lines,
            max_bytes = shared.config.buffer_max_bytes,
            "influxdb2 buffer is full; dropped its oldest points"
        );
    }
}

/// The next batch to send: up to `max_lines` whole lines of the first segment.
struct Batch {
    sequence: u64,
    start: u64,
    bytes: Vec<u8>,
    lines: u64,
    /// The buffer's `removed` count once this batch is delivered.
    end_position: u64,
}

fn next_batch(shared: &Shared, max_lines: u64) -> std::io::Result<Option<Batch>> {
    let state = shared.lock();
    let Some(first) = state.segments.front() else {
        return Ok(None);
    };
    let (sequence, start, end, path, removed) = (
        first.sequence,
        state.cursor,
        first.bytes,
        first.path.clone(),
        state.removed,
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
            if lines == max_lines {
                break;
            }
        }
    }
    if lines == 0 {
        return Ok(None);
    }
    bytes.truncate(cut);
    Ok(Some(Batch {
        sequence,
        start,
        end_position: removed + cut as u64,
        bytes,
        lines,
    }))
}

/// Marks a batch as delivered (or dropped as invalid): moves the cursor, persists it, and
/// deletes a finished segment unless it is the one being written. Returns the buffer's
/// `removed` count afterwards.
fn commit_batch(shared: &Shared, batch: &Batch) -> u64 {
    let mut state = shared.lock();
    let matches = state
        .segments
        .front()
        .is_some_and(|s| s.sequence == batch.sequence)
        && state.cursor == batch.start;
    if !matches {
        // The segment was dropped for space while the batch was in flight.
        return state.removed;
    }
    state.cursor += batch.bytes.len() as u64;
    state.cursor_lines += batch.lines;
    state.remove_pending(batch.bytes.len() as u64);
    let first = state.segments.front().expect("checked above");
    let finished = state.cursor >= first.bytes
        && (state.segments.len() > 1 || first.bytes >= shared.segment_max_bytes);
    if finished {
        let done = state.segments.pop_front().expect("checked above");
        let _ = fs::remove_file(&done.path);
        state.cursor = 0;
        state.cursor_lines = 0;
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
    shared.update_buffer_gauge(&state);
    state.removed
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

    fn latest(
        &self,
        selector: &Selector,
    ) -> Result<Vec<(SeriesKey, Timestamp, Value)>, StorageError> {
        self.primary.latest(selector)
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
            token = "unit-test-token"
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
    fn missing_token_names_key() {
        let config = InfluxDb2Config {
            token: None,
            token_env: "STONELION_UNIT_TEST_UNSET_TOKEN".into(),
            ..config()
        };
        let message = config.validate().expect_err("missing token").to_string();
        assert!(
            message.starts_with("invalid storage.influxdb2.token"),
            "{message}"
        );
        assert!(
            message.contains("STONELION_UNIT_TEST_UNSET_TOKEN"),
            "{message}"
        );
    }

    #[test]
    fn debug_redacts_token() {
        let text = format!("{:?}", config());
        assert!(!text.contains("unit-test-token"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn small_buffer_limit_rejected() {
        let config = InfluxDb2Config {
            buffer_max_bytes: BUFFER_MIN_BYTES - 1,
            ..config()
        };
        let message = config.validate().expect_err("buffer too small").to_string();
        assert!(
            message.starts_with("invalid storage.influxdb2.buffer_max_bytes"),
            "{message}"
        );
        assert_eq!(segment_max_bytes(BUFFER_MIN_BYTES), 8 * 1024);
        assert_eq!(
            segment_max_bytes(default_buffer_max_bytes()),
            SEGMENT_MAX_BYTES
        );
    }

    #[test]
    fn load_cuts_torn_last_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let whole = "m,site=a v=1 1000\nm,site=a v=2 2000\n";
        let path = segment_path(dir.path(), 0);
        fs::write(&path, format!("{whole}m,site=a v=")).expect("write segment");
        let state = load_buffer(dir.path(), Duration::from_secs(1)).expect("buffer loads");
        let segment = state.segments.front().expect("one segment");
        assert_eq!(segment.bytes, whole.len() as u64);
        assert_eq!(segment.lines, 2);
        assert_eq!(state.pending_lines(), 2);
        let on_disk = fs::read_to_string(&path).expect("read segment");
        assert_eq!(on_disk, whole);
    }

    #[test]
    fn load_skips_delivered_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = "m v=1 1000\n";
        fs::write(
            segment_path(dir.path(), 3),
            format!("{first}m v=2 2000\nm v=3 3000\n"),
        )
        .expect("write segment");
        fs::write(dir.path().join("cursor"), format!("3 {}", first.len())).expect("cursor");
        let state = load_buffer(dir.path(), Duration::from_secs(1)).expect("buffer loads");
        assert_eq!(state.cursor_lines, 1);
        assert_eq!(state.pending_lines(), 2);
        assert_eq!(state.appended, buffered_bytes(&state));
        assert!(
            state.oldest_pending_age() >= Some(Duration::from_secs(1)),
            "points left from an earlier run are due at once"
        );
    }

    #[test]
    fn append_after_torn_line_starts_on_boundary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = segment_path(dir.path(), 0);
        fs::write(&path, "gas-detector v=1 1000\ngas-det").expect("write segment");
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("loopback port")
            .port();
        let config = InfluxDb2Config {
            url: format!("http://127.0.0.1:{closed_port}"),
            buffer_dir: dir.path().to_path_buf(),
            retry_initial_backoff: Duration::from_secs(60),
            retry_max_backoff: Duration::from_secs(60),
            ..config()
        };
        let store = InfluxDb2Store::open(config, &SharedRegistry::new()).expect("store opens");
        let point = Point {
            series: SeriesKey::new("gas-detector", vec![], "gas_lel"),
            ts: Timestamp(2_000),
            value: Value::Number(2.0),
        };
        store.write(vec![point]).expect("write");
        drop(store);
        let on_disk = fs::read_to_string(&path).expect("read segment");
        assert_eq!(
            on_disk,
            "gas-detector v=1 1000\ngas-detector gas_lel=2 2000\n"
        );
    }

    #[test]
    fn unusable_buffer_dir_names_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("not-a-folder");
        fs::write(&file, "").expect("create file");
        let config = InfluxDb2Config {
            buffer_dir: file,
            ..config()
        };
        let message = InfluxDb2Store::open(config, &SharedRegistry::new())
            .err()
            .expect("a file is not a buffer folder")
            .to_string();
        assert!(
            message.contains("storage.influxdb2.buffer_dir"),
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
