//! InfluxDB 1.x compatible query endpoint (`/query`) over any [`TimeSeriesStore`], so
//! Grafana's InfluxDB data source in InfluxQL mode and InfluxDB 1.x clients can read
//! Stonelion's time series directly.
//!
//! The store's one database is [`DATABASE`], with the one retention policy `autogen`.
//! Statements are parsed by [`parser`], evaluated by [`show`] and [`select`] on the store
//! trait, and rendered by [`response`] in InfluxDB 1.x's JSON shape.

mod aggregate;
mod ast;
mod catalog;
mod condition;
mod functions;
mod lexer;
mod limits;
mod parser;
mod pushdown;
mod response;
mod select;
mod show;
mod time;

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::storage::TimeSeriesStore;

pub use self::limits::QueryLimits;

use self::limits::Budget;
use self::response::{Rendering, StatementResult};
use self::time::Epoch;

/// Name of the database that `/query` serves.
pub const DATABASE: &str = "stonelion";

/// Name of the one retention policy.
pub const RETENTION_POLICY: &str = "autogen";

/// Version string sent in `X-Influxdb-Version`, which some clients read to pick a dialect.
const VERSION_HEADER: &str = "1.8.10-stonelion";

/// A query that does not parse, with the position InfluxDB would report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub message: String,
    /// Line of the error, from 1.
    pub line: usize,
    /// Character within the line, from 1.
    pub char: usize,
}

impl ParseError {
    /// Builds an error at a byte offset of `query`.
    pub fn at(query: &str, offset: usize, message: impl Into<String>) -> ParseError {
        let before = &query[..offset.min(query.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let char = before[line_start..].chars().count() + 1;
        ParseError {
            message: message.into(),
            line,
            char,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {}, char {}",
            self.message, self.line, self.char
        )
    }
}

impl std::error::Error for ParseError {}

/// Builds the router serving `GET` and `POST /query` and `GET /ping` on `store`, with the
/// default [`QueryLimits`].
///
/// NOTE: the router checks no credentials; the `u`, `p` parameters and the
/// `Authorization` header are ignored, so the caller must put it behind the API's
/// authentication.
pub fn router(store: Arc<dyn TimeSeriesStore>) -> Router {
    router_with_limits(store, QueryLimits::default())
}

/// Builds the router like [`router`], with per-request limits on series, points and
/// `GROUP BY time()` buckets.
pub fn router_with_limits(store: Arc<dyn TimeSeriesStore>, limits: QueryLimits) -> Router {
    router_with_clock(store, limits, now_nanos)
}

/// Builds the router like [`router_with_limits`], with `now` as the source of the current
/// time in nanoseconds: the value of `now()` in queries, and the end of `GROUP BY time()`
/// windows without an upper time bound. A fixed clock makes results independent of the
/// date, as the fuzz target needs.
pub fn router_with_clock(
    store: Arc<dyn TimeSeriesStore>,
    limits: QueryLimits,
    now: fn() -> i64,
) -> Router {
    Router::new()
        .route("/query", get(query_handler).post(query_handler))
        .route("/ping", get(ping_handler).head(ping_handler))
        .with_state(QueryState { store, limits, now })
}

/// State of the `/query` routes.
#[derive(Clone)]
struct QueryState {
    store: Arc<dyn TimeSeriesStore>,
    limits: QueryLimits,
    now: fn() -> i64,
}

async fn ping_handler() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    add_version_headers(response.headers_mut());
    response
}

async fn query_handler(
    State(QueryState { store, limits, now }): State<QueryState>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match QueryParams::parse(raw_query.as_deref(), &headers, &body) {
        Ok(params) => params,
        Err(message) => {
            return json_response(StatusCode::BAD_REQUEST, &error_body(&message), false);
        }
    };
    let pretty = params.pretty;
    let now_ns = now();
    let outcome =
        tokio::task::spawn_blocking(move || run_query(store.as_ref(), limits, &params, now_ns))
            .await;
    match outcome {
        Ok(Ok(body)) => json_response(StatusCode::OK, &body, pretty),
        Ok(Err(message)) => json_response(StatusCode::BAD_REQUEST, &error_body(&message), pretty),
        Err(join_error) => {
            tracing::error!(error = %join_error, "influxql query task failed");
            let body = error_body("query evaluation failed; see the server log");
            json_response(StatusCode::INTERNAL_SERVER_ERROR, &body, pretty)
        }
    }
}

/// Parses and evaluates every statement. A parse error fails the whole request, as in
/// InfluxDB; an evaluation error becomes that statement's `error`.
fn run_query(
    store: &dyn TimeSeriesStore,
    limits: QueryLimits,
    params: &QueryParams,
    now_ns: i64,
) -> Result<serde_json::Value, String> {
    let statements = parser::parse_query(&params.query, now_ns)
        .map_err(|e| format!("error parsing query: {e}"))?;
    let context = EvalContext {
        store,
        database: params.database.as_deref(),
        now_ns,
        budget: Budget::new(limits),
    };
    let mut results = Vec::with_capacity(statements.len());
    for (statement_id, statement) in statements.iter().enumerate() {
        let result = context.evaluate(statement);
        if let Err(message) = &result.outcome {
            tracing::debug!(statement_id, error = %message, "influxql statement failed");
        }
        results.push(result.render(
            statement_id,
            Rendering {
                epoch: params.epoch,
            },
        ));
    }
    Ok(serde_json::json!({ "results": results }))
}

/// What every statement's evaluation needs.
pub(crate) struct EvalContext<'a> {
    pub store: &'a dyn TimeSeriesStore,
    /// The `db` parameter, when the request named one.
    pub database: Option<&'a str>,
    pub now_ns: i64,
    /// The request's budget of series, points and buckets, shared by all its statements.
    pub budget: Budget,
}

impl EvalContext<'_> {
    fn evaluate(&self, statement: &ast::Statement) -> StatementResult {
        use ast::Statement as S;
        let outcome = match statement {
            S::Select(select) => select::evaluate(self, select),
            S::ShowDatabases => Ok((show::databases(), None)),
            S::ShowRetentionPolicies { database } => {
                show::retention_policies(self, database.as_deref()).map(|s| (s, None))
            }
            S::ShowMeasurements(show) => show::measurements(self, show).map(|s| (s, None)),
            S::ShowTagKeys(show) => show::tag_keys(self, show).map(|s| (s, None)),
            S::ShowTagValues(show) => show::tag_values(self, show).map(|s| (s, None)),
            S::ShowFieldKeys(show) => show::field_keys(self, show).map(|s| (s, None)),
            S::ShowSeries(show) => show::series(self, show).map(|s| (s, None)),
        };
        StatementResult { outcome }
    }

    /// Checks that a database named by the request or the statement is the one served.
    pub fn check_database(&self, named: Option<&str>) -> Result<(), String> {
        match named.or(self.database) {
            Some(name) if name != DATABASE => Err(format!("database not found: {name}")),
            _ => Ok(()),
        }
    }
}

/// The request parameters `/query` reads.
struct QueryParams {
    query: String,
    database: Option<String>,
    epoch: Option<Epoch>,
    pretty: bool,
}

impl QueryParams {
    /// Reads parameters from the URL and, for form-encoded `POST` bodies such as Grafana
    /// sends, from the body; body values win.
    fn parse(
        raw_query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<QueryParams, String> {
        let mut pairs: Vec<(String, String)> = match raw_query {
            Some(raw) => {
                serde_urlencoded::from_str(raw).map_err(|e| format!("invalid query string: {e}"))?
            }
            None => Vec::new(),
        };
        let is_form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if is_form && !body.is_empty() {
            let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
                .map_err(|e| format!("invalid form body: {e}"))?;
            pairs.extend(form);
        }
        let param = |name: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let query = param("q").filter(|q| !q.trim().is_empty());
        let Some(query) = query else {
            return Err("missing required parameter \"q\"".into());
        };
        let epoch = match param("epoch").filter(|e| !e.is_empty()) {
            Some(unit) => Some(
                Epoch::from_param(&unit)
                    .ok_or_else(|| format!("invalid epoch {unit:?}: use ns, u, ms, s, m or h"))?,
            ),
            None => None,
        };
        let database = param("db").filter(|db| !db.is_empty());
        let pretty = param("pretty").is_some_and(|p| p == "true");
        Ok(QueryParams {
            query,
            database,
            epoch,
            pretty,
        })
    }
}

fn error_body(message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

fn json_response(status: StatusCode, body: &serde_json::Value, pretty: bool) -> Response {
    let text = if pretty {
        serde_json::to_string_pretty(body)
    } else {
        serde_json::to_string(body)
    };
    // Serializing a serde_json::Value cannot fail.
    let text = text.unwrap_or_default();
    let mut response = (status, text).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_version_headers(headers);
    response
}

fn add_version_headers(headers: &mut HeaderMap) {
    headers.insert(
        "X-Influxdb-Version",
        HeaderValue::from_static(VERSION_HEADER),
    );
    headers.insert("X-Influxdb-Build", HeaderValue::from_static("OSS"));
}

fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}
