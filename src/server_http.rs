//! The HTTP router of a running server: the API plus the InfluxDB-compatible routes
//! (`/api/v2/write`, `/write` and `/query`).

use std::sync::Arc;

use axum::Router;

use crate::api::{self, AppState};
use crate::ingest::{IngestHandle, line_protocol};
use crate::metrics::SharedRegistry;
use crate::storage::TimeSeriesStore;

/// Builds the server's whole router.
pub fn router(app: AppState, ingest: IngestHandle, store: Arc<dyn TimeSeriesStore>, registry: &SharedRegistry) -> Router {
    // The API router answers unknown paths itself, so the other routers are merged into it
    // rather than the other way round.
    line_protocol::router(ingest, registry).merge(api::influxql::router(store)).merge(api::router(app))
}
