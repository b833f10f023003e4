//! HTTP API (axum): health, devices and their series, alarms and operator actions,
//! config reload and device management, Prometheus metrics. [`router`] builds the whole router, so tests can call it
//! in-process.

mod admin;
pub mod auth;
pub mod error;
mod handlers;
pub mod influxql;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::{get, post};

use crate::alarms::manager::AlarmHandle;
use crate::clock::SharedClock;
use crate::config::SharedConfig;
use crate::metrics::SharedRegistry;
use crate::pipeline::DeviceStates;
use crate::storage::TimeSeriesStore;
pub use error::ApiError;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The config in use; replaced on reload.
    pub config: SharedConfig,
    /// Applies config reloads and device changes.
    pub reloader: Arc<crate::reload::Reloader>,
    pub states: DeviceStates,
    pub store: Arc<dyn TimeSeriesStore>,
    pub alarms: AlarmHandle,
    /// A read connection to the state database, for alarm queries.
    pub alarm_reader: Arc<Mutex<rusqlite::Connection>>,
    pub state_db: PathBuf,
    pub registry: SharedRegistry,
    pub clock: SharedClock,
}

/// Builds the API router, without the InfluxDB-compatible routes that the server adds.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .route("/api/v1/sites", get(handlers::sites))
        .route("/api/v1/devices", get(handlers::devices))
        .route(
            "/api/v1/devices/{id}",
            get(handlers::device)
                .put(admin::put_device)
                .delete(admin::delete_device),
        )
        .route("/api/v1/devices/{id}/series", get(handlers::series))
        .route("/api/v1/alarms", get(handlers::alarms))
        .route("/api/v1/alarms/{id}", get(handlers::alarm))
        .route("/api/v1/alarms/{id}/ack", post(handlers::acknowledge))
        .route("/api/v1/alarms/{id}/close", post(handlers::close))
        .route("/api/v1/alarms/{id}/reset", post(admin::reset))
        .route("/api/v1/admin/reload", post(admin::reload))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}
