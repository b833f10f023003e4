//! Stonelion: a safety-production telemetry and alarm server.
//!
//! Readings flow through stages, one module each: [`ingest`] (MQTT broker, Modbus poller,
//! HTTP writes), [`pipeline`] (validation and routing), [`storage`] (time series),
//! [`rules`] and [`alarms`] (thresholds and the alarm lifecycle), [`notify`] (webhooks)
//! and [`api`] (HTTP). [`summary`] writes each site's counts for dashboards. [`server`]
//! starts and stops them in order.

pub mod alarms;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
mod logging;
pub mod metrics;
pub mod modbus;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod profile;
pub mod reload;
pub mod rules;
pub mod security;
pub mod server;
mod server_http;
mod server_modbus;
pub mod storage;
pub mod summary;
