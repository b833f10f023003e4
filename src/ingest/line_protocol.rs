//! InfluxDB-compatible HTTP write endpoint: `POST /api/v2/write` (InfluxDB 2) and
//! `POST /write` (InfluxDB 1.x), taking line protocol, optionally gzip-compressed.
//!
//! Each line becomes one point per field: measurement = device profile, tags as sent
//! (`site`, `device` and `site_kind` identify a known device), field = metric. Integer,
//! unsigned and float fields become numbers and booleans become bools. String fields are
//! skipped and counted, and the response is a partial-write 400 that names the first one.
//! `org`, `bucket` and `db` are accepted and ignored, because there is one store.
//!
//! Status codes follow InfluxDB: 204 when every line was stored, 400 with
//! `{"code":"invalid","message":...}` when some lines or fields were rejected (the valid
//! ones are still stored), 413 for a body over the limit, 415 for an unknown
//! `Content-Encoding`, and 503 when the pipeline is shut down.

use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use influxdb_line_protocol::{FieldValue, ParsedLine};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use crate::clock::{SharedClock, SystemClock};
use crate::ingest::{IngestHandle, WriteFailure};
use crate::metrics::SharedRegistry;
use crate::model::{Timestamp, Value};
use crate::storage::{Point, SeriesKey};

/// Limits of the write endpoint.
#[derive(Clone)]
pub struct WriteOptions {
    /// Maximum request body, after gzip decompression.
    pub max_body_bytes: usize,
    /// Time given to lines that carry no timestamp.
    pub clock: SharedClock,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Counters of the write endpoint.
#[derive(Clone, Debug, Default)]
pub struct WriteMetrics {
    pub requests: Counter,
    pub lines_accepted: Counter,
    pub lines_rejected: Counter,
    pub string_fields_skipped: Counter,
    pub points_written: Counter,
    pub bodies_rejected: Counter,
}

impl WriteMetrics {
    fn register(&self, registry: &SharedRegistry) {
        registry.register(|r| {
            let r = r.sub_registry_with_prefix("http_write");
            r.register("requests", "Write requests received", self.requests.clone());
            r.register(
                "lines_accepted",
                "Line-protocol lines stored",
                self.lines_accepted.clone(),
            );
            r.register(
                "lines_rejected",
                "Line-protocol lines that failed to parse",
                self.lines_rejected.clone(),
            );
            r.register(
                "string_fields_skipped",
                "String fields skipped because only numbers and booleans are stored",
                self.string_fields_skipped.clone(),
            );
            r.register(
                "points_written",
                "Points handed to the pipeline",
                self.points_written.clone(),
            );
            r.register(
                "bodies_rejected",
                "Requests rejected whole: too large, bad encoding or bad precision",
                self.bodies_rejected.clone(),
            );
        });
    }
}

/// Timestamp unit of the lines in a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// Parses InfluxDB 2's `ns`, `us`, `ms`, `s`; with `v1`, also 1.x's `n`, `u`, `m`, `h`.
    pub fn parse(value: &str, v1: bool) -> Option<Precision> {
        match (value, v1) {
            ("ns", _) | ("n", true) => Some(Precision::Nanoseconds),
            ("us", _) | ("u", true) => Some(Precision::Microseconds),
            ("ms", _) => Some(Precision::Milliseconds),
            ("s", _) => Some(Precision::Seconds),
            ("m", true) => Some(Precision::Minutes),
            ("h", true) => Some(Precision::Hours),
            _ => None,
        }
    }

    /// Converts a timestamp in this unit to milliseconds, rounding down; `None` on overflow.
    pub fn to_millis(self, ts: i64) -> Option<i64> {
        match self {
            Precision::Nanoseconds => Some(ts.div_euclid(1_000_000)),
            Precision::Microseconds => Some(ts.div_euclid(1_000)),
            Precision::Milliseconds => Some(ts),
            Precision::Seconds => ts.checked_mul(1_000),
            Precision::Minutes => ts.checked_mul(60_000),
            Precision::Hours => ts.checked_mul(3_600_000),
        }
    }
}

/// A line or field that was not stored, with its 1-based line number.
#[derive(Clone, Debug, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub text: String,
    pub reason: String,
}

/// The points of a request body and what was rejected on the way.
#[derive(Debug, Default)]
pub struct ParsedBody {
    pub points: Vec<Point>,
    pub lines_accepted: u64,
    pub lines_rejected: u64,
    pub string_fields_skipped: u64,
    /// The first rejected line or skipped field.
    pub first_error: Option<LineError>,
}

const MAX_QUOTED_LINE: usize = 200;

fn quote_line(line: &str) -> String {
    match line.char_indices().nth(MAX_QUOTED_LINE) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_owned(),
    }
}

impl ParsedBody {
    fn reject(&mut self, line: usize, text: &str, reason: String) {
        if self.first_error.is_none() {
            self.first_error = Some(LineError {
                line,
                text: quote_line(text),
                reason,
            });
        }
    }
}

/// Parses a line-protocol body into points. Bad lines are skipped and reported, never fatal.
pub fn parse_body(body: &str, precision: Precision, now: Timestamp) -> ParsedBody {
    let mut parsed = ParsedBody::default();
    for (index, line) in split_lines(body).enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match influxdb_line_protocol::parse_lines(trimmed).next() {
            Some(Ok(parsed_line)) => add_line(
                &mut parsed,
                index + 1,
                trimmed,
                &parsed_line,
                precision,
                now,
            ),
            Some(Err(err)) => {
                parsed.lines_rejected += 1;
                let message = match non_finite_field(trimmed) {
                    Some((key, value)) => format!(
                        "invalid line protocol: field `{key}` has the value `{value}`, which \
                         line protocol cannot carry; leave the field out of the line while the \
                         reading is not a finite number"
                    ),
                    None => format!("invalid line protocol: {err}"),
                };
                parsed.reject(index + 1, trimmed, message);
            }
            None => {}
        }
    }
    parsed
}

/// Returns the first field of `line` whose value is NaN or an infinity, which the line
/// protocol parser rejects with a message that does not name the field. Only the common
/// case is recognised: a measurement and tags without escaped spaces.
fn non_finite_field(line: &str) -> Option<(&str, &str)> {
    let fields = line.split(' ').nth(1)?;
    fields.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        let number = value.trim_start_matches(['+', '-']).to_ascii_lowercase();
        matches!(number.as_str(), "nan" | "inf" | "infinity").then_some((key, value))
    })
}

/// Splits a body into lines like `influxdb_line_protocol::split_lines`, which scans every
/// character to find newlines inside quoted string fields. Only a quote or a backslash can
/// make a newline part of a line, so a body without either splits at every newline, found
/// with `memchr`.
fn split_lines(body: &str) -> Box<dyn Iterator<Item = &str> + '_> {
    if memchr::memchr2(b'"', b'\\', body.as_bytes()).is_some() {
        Box::new(influxdb_line_protocol::split_lines(body))
    } else {
        Box::new(body.split('\n'))
    }
}

fn add_line(
    parsed: &mut ParsedBody,
    number: usize,
    text: &str,
    line: &ParsedLine<'_>,
    precision: Precision,
    now: Timestamp,
) {
    let ts = match line.timestamp {
        None => now,
        Some(raw) => match precision.to_millis(raw) {
            Some(ms) => Timestamp(ms),
            None => {
                parsed.lines_rejected += 1;
                parsed.reject(
                    number,
                    text,
                    format!("timestamp {raw} overflows at precision {precision:?}"),
                );
                return;
            }
        },
    };
    let measurement = line.series.measurement.as_str();
    // Sorted once per line, because every field of the line shares the tag set.
    let mut tags: Vec<(&str, &str)> = line
        .series
        .tag_set
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    tags.sort_unstable();
    // With a tag twice, `device=a,device=b`, readers that take the first or the last
    // value would attribute the point to different devices.
    if let Some(repeated) = tags.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        parsed.lines_rejected += 1;
        parsed.reject(
            number,
            text,
            format!(
                "tag \"{}\" appears more than once; send each tag once",
                repeated[0].0
            ),
        );
        return;
    }
    let mut values = Vec::with_capacity(line.field_set.len());
    for (field, value) in &line.field_set {
        let value = match value {
            FieldValue::F64(v) if !v.is_finite() => {
                parsed.lines_rejected += 1;
                parsed.reject(
                    number,
                    text,
                    format!(
                        "field \"{}\" is {v}, which is not a finite number; send a finite value or leave the field out",
                        field.as_str()
                    ),
                );
                return;
            }
            FieldValue::F64(v) => Value::Number(*v),
            FieldValue::I64(v) => Value::Number(*v as f64),
            FieldValue::U64(v) => Value::Number(*v as f64),
            FieldValue::Boolean(b) => Value::Bool(*b),
            FieldValue::String(_) => {
                parsed.string_fields_skipped += 1;
                parsed.reject(
                    number,
                    text,
                    format!(
                        "field \"{}\" is a string; only numbers and booleans are stored, so send it as a tag or drop it",
                        field.as_str()
                    ),
                );
                continue;
            }
        };
        values.push((field.as_str(), value));
    }
    let Some(last) = values.len().checked_sub(1) else {
        return;
    };
    // The tags are already sorted and unique, so the keys are built directly instead of
    // through `SeriesKey::new`, and the last field takes the owned tags without a copy.
    let mut owned_tags: Vec<(String, String)> = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    parsed.points.reserve(values.len());
    for (i, (field, value)) in values.into_iter().enumerate() {
        let tags = if i == last {
            std::mem::take(&mut owned_tags)
        } else {
            owned_tags.clone()
        };
        let series = SeriesKey {
            measurement: measurement.to_owned(),
            tags,
            field: field.to_owned(),
        };
        parsed.points.push(Point { series, ts, value });
    }
    parsed.lines_accepted += 1;
}

#[derive(Debug, Deserialize)]
struct V2Params {
    #[serde(default)]
    precision: Option<String>,
}

#[derive(Debug, Deserialize)]
struct V1Params {
    #[serde(default)]
    precision: Option<String>,
}

#[derive(Clone)]
struct WriteState {
    ingest: IngestHandle,
    metrics: WriteMetrics,
    options: WriteOptions,
}

/// An InfluxDB-style error response: a status and a JSON body `{"code", "message"}`.
#[derive(Debug)]
pub struct WriteError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl WriteError {
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            code,
            message,
        }
    }
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// Builds the write router with default limits.
pub fn router(ingest: IngestHandle, registry: &SharedRegistry) -> Router {
    router_with_options(ingest, registry, WriteOptions::default())
}

/// Builds the write router: `POST /api/v2/write` and `POST /write`.
pub fn router_with_options(
    ingest: IngestHandle,
    registry: &SharedRegistry,
    options: WriteOptions,
) -> Router {
    let metrics = WriteMetrics::default();
    metrics.register(registry);
    let state = WriteState {
        ingest,
        metrics,
        options,
    };
    Router::new()
        .route("/api/v2/write", post(write_v2))
        .route("/write", post(write_v1))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn write_v2(
    State(state): State<WriteState>,
    Query(params): Query<V2Params>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, WriteError> {
    let precision = parse_precision(params.precision.as_deref(), false, &state.metrics)?;
    handle_write(&state, precision, &headers, body).await
}

async fn write_v1(
    State(state): State<WriteState>,
    Query(params): Query<V1Params>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, WriteError> {
    let precision = parse_precision(params.precision.as_deref(), true, &state.metrics)?;
    handle_write(&state, precision, &headers, body).await
}

fn parse_precision(
    value: Option<&str>,
    v1: bool,
    metrics: &WriteMetrics,
) -> Result<Precision, WriteError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(Precision::Nanoseconds);
    };
    Precision::parse(value, v1).ok_or_else(|| {
        metrics.bodies_rejected.inc();
        let allowed = if v1 {
            "n, ns, u, us, ms, s, m or h"
        } else {
            "ns, us, ms or s"
        };
        WriteError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("invalid precision \"{value}\"; use {allowed}"),
        )
    })
}

async fn handle_write(
    state: &WriteState,
    precision: Precision,
    headers: &HeaderMap,
    body: Body,
) -> Result<StatusCode, WriteError> {
    state.metrics.requests.inc();
    let limit = state.options.max_body_bytes;
    let gzip = content_is_gzip(headers).inspect_err(|_| {
        state.metrics.bodies_rejected.inc();
    })?;
    let raw = axum::body::to_bytes(body, limit).await.map_err(|_| {
        state.metrics.bodies_rejected.inc();
        too_large(limit)
    })?;
    let now = state.options.clock.now();

    // Decompression and parsing take most of a request's CPU time, so they run on the
    // blocking pool and several requests parse in parallel.
    let parsed =
        tokio::task::spawn_blocking(move || decode_and_parse(&raw, gzip, limit, precision, now))
            .await
            .map_err(|e| {
                WriteError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                    format!("parser task failed: {e}"),
                )
            })?
            .inspect_err(|_| {
                state.metrics.bodies_rejected.inc();
            })?;
    state.metrics.lines_accepted.inc_by(parsed.lines_accepted);
    state.metrics.lines_rejected.inc_by(parsed.lines_rejected);
    state
        .metrics
        .string_fields_skipped
        .inc_by(parsed.string_fields_skipped);

    let point_count = parsed.points.len() as u64;
    let stored = if parsed.points.is_empty() {
        Ok(())
    } else {
        store(state, parsed.points).await
    };
    if stored.is_ok() {
        state.metrics.points_written.inc_by(point_count);
    }
    let Some(first) = parsed.first_error else {
        return stored.map(|()| StatusCode::NO_CONTENT);
    };
    // A line that failed to parse is reported first, as InfluxDB does, with the outcome of
    // storing the other lines appended so that neither is hidden.
    let mut error = partial_write(
        &first,
        parsed.lines_rejected,
        parsed.string_fields_skipped,
        point_count,
    );
    if let Err(also) = stored {
        if also.status.is_server_error() {
            return Err(also);
        }
        error.message = format!("{}; also: {}", error.message, also.message);
    }
    Err(error)
}

async fn store(state: &WriteState, points: Vec<Point>) -> Result<(), WriteError> {
    match state.ingest.write_points(points).await {
        Ok(Ok(())) => Ok(()),
        // InfluxDB answers a field type conflict with 422; the other points are stored.
        Ok(Err(WriteFailure::Conflict(message))) => Err(WriteError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable entity",
            format!("field type conflict: {message}; write each field with one type"),
        )),
        Ok(Err(WriteFailure::Rejected(message))) => Err(WriteError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable entity",
            message,
        )),
        // InfluxDB 1.8 rejects points beyond `max-series-per-database` with a 400 whose
        // message starts with "partial write:", and so does this message.
        Ok(Err(WriteFailure::SeriesLimit(message))) => {
            Err(WriteError::new(StatusCode::BAD_REQUEST, "invalid", message))
        }
        Ok(Err(WriteFailure::Storage(message))) => {
            tracing::warn!(error = %message, "storage rejected an HTTP write");
            Err(WriteError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                format!("storing the points failed: {message}"),
            ))
        }
        Err(closed) => Err(WriteError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{closed}; retry later"),
        )),
    }
}

fn partial_write(
    first: &LineError,
    rejected_lines: u64,
    skipped_fields: u64,
    stored_points: u64,
) -> WriteError {
    WriteError::new(
        StatusCode::BAD_REQUEST,
        "invalid",
        format!(
            "partial write: line {}: {} (line: \"{}\"); {rejected_lines} lines rejected, {skipped_fields} string fields skipped, {stored_points} points stored",
            first.line, first.reason, first.text
        ),
    )
}

fn too_large(limit: usize) -> WriteError {
    WriteError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request too large",
        format!(
            "request body exceeds the limit of {limit} bytes; split the write into smaller batches"
        ),
    )
}

fn content_is_gzip(headers: &HeaderMap) -> Result<bool, WriteError> {
    let Some(encoding) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    match encoding.to_str().map(|e| e.trim().to_ascii_lowercase()) {
        Ok(e) if e == "gzip" => Ok(true),
        Ok(e) if e.is_empty() || e == "identity" => Ok(false),
        _ => Err(WriteError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported media type",
            format!(
                "Content-Encoding {encoding:?} is not supported; send gzip or an uncompressed body"
            ),
        )),
    }
}

fn decode_and_parse(
    raw: &Bytes,
    gzip: bool,
    limit: usize,
    precision: Precision,
    now: Timestamp,
) -> Result<ParsedBody, WriteError> {
    let decompressed;
    let bytes: &[u8] = if gzip {
        decompressed = gunzip(raw, limit)?;
        &decompressed
    } else {
        raw
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        WriteError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "request body is not valid UTF-8 at byte {}",
                e.valid_up_to()
            ),
        )
    })?;
    Ok(parse_body(text, precision, now))
}

fn gunzip(raw: &[u8], limit: usize) -> Result<Vec<u8>, WriteError> {
    let mut out = Vec::with_capacity(raw.len() * 4);
    let decoder = flate2::read::MultiGzDecoder::new(raw);
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            WriteError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("request body is not valid gzip: {e}"),
            )
        })?;
    if out.len() > limit {
        return Err(too_large(limit));
    }
    Ok(out)
}
