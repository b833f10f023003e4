//! The HTTP router of a running server: the API plus the InfluxDB-compatible routes
//! (`/api/v2/write`, `/write` and `/query`).

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::{self, AppState};
use crate::ingest::{IngestHandle, line_protocol};
use crate::metrics::SharedRegistry;
use crate::storage::TimeSeriesStore;

/// Builds the server's whole router.
pub fn router(
    app: AppState,
    ingest: IngestHandle,
    store: Arc<dyn TimeSeriesStore>,
    query_limits: api::influxql::QueryLimits,
    registry: &SharedRegistry,
) -> Router {
    // The API router answers unknown paths itself, so the other routers are merged into it
    // rather than the other way round.
    line_protocol::router(ingest, registry)
        .merge(api::influxql::router_with_limits(store, query_limits))
        .merge(api::router(app))
}

/// Builds the CORS layer for `[server] cors_allowed_origins`, or `None` when the list is
/// empty, so that no CORS headers are sent by default. Browsers may then send requests
/// with a bearer token from these origins only.
pub fn cors_layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|origin| {
            HeaderValue::from_str(origin).map_err(|e| {
                anyhow::anyhow!("CORS origin `{origin}` is not a valid header value: {e}")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600));
    Ok(Some(layer))
}
