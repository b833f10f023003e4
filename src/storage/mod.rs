//! Time-series storage behind one trait, so backends can be swapped without touching
//! ingestion, rules or the API.
//!
//! The schema is shared by every backend and by line-protocol ingestion: the measurement
//! is the device profile, the tags are `site`, `device` and `site_kind`, and each metric
//! is a field. Timestamps are milliseconds since the Unix epoch.

pub mod engine;
pub mod influxdb2;
pub mod sqlite;

use std::time::Duration;

use thiserror::Error;

use crate::model::{Timestamp, Value, ValueKind};

/// Identity of one stored series: a measurement, its sorted tag set and one field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub measurement: String,
    /// Tag pairs sorted by key, with unique keys.
    pub tags: Vec<(String, String)>,
    pub field: String,
}

impl SeriesKey {
    /// Builds a key, sorting the tags by key.
    pub fn new(
        measurement: impl Into<String>,
        mut tags: Vec<(String, String)>,
        field: impl Into<String>,
    ) -> Self {
        tags.sort();
        tags.dedup_by(|a, b| a.0 == b.0);
        Self {
            measurement: measurement.into(),
            tags,
            field: field.into(),
        }
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One value of one series at one time.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub series: SeriesKey,
    pub ts: Timestamp,
    pub value: Value,
}

/// Which series a query reads: every filter that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub measurement: Option<String>,
    /// Tags that must be equal to the given values.
    pub tags: Vec<(String, String)>,
    pub field: Option<String>,
}

impl Selector {
    pub fn matches(&self, key: &SeriesKey) -> bool {
        self.measurement
            .as_ref()
            .is_none_or(|m| *m == key.measurement)
            && self.field.as_ref().is_none_or(|f| *f == key.field)
            && self
                .tags
                .iter()
                .all(|(k, v)| key.tag(k) == Some(v.as_str()))
    }
}

/// Aggregation applied to each step of an aggregated query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Mean,
    Min,
    Max,
    First,
    Last,
    Sum,
    Count,
}

impl Aggregate {
    pub const ALL: [Aggregate; 7] = [
        Aggregate::Mean,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::First,
        Aggregate::Last,
        Aggregate::Sum,
        Aggregate::Count,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Mean => "mean",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::First => "first",
            Aggregate::Last => "last",
            Aggregate::Sum => "sum",
            Aggregate::Count => "count",
        }
    }
}

/// A range query: raw points, or one aggregated value per step.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub selector: Selector,
    /// Inclusive start.
    pub from: Timestamp,
    /// Exclusive end.
    pub to: Timestamp,
    /// Step width and aggregation; `None` returns raw points.
    pub aggregation: Option<(Duration, Aggregate)>,
    /// Maximum number of points returned per series; `None` means no limit.
    pub limit: Option<usize>,
}

/// The points of one series that a query returned, in time order.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesData {
    pub series: SeriesKey,
    pub kind: ValueKind,
    /// For aggregated queries, the timestamp is the start of the step.
    pub points: Vec<(Timestamp, Value)>,
}

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("embedded database failed: {0}")]
    Database(String),
    #[error("series {series} stores {stored:?} values; a {offered:?} value cannot be added")]
    KindMismatch {
        series: String,
        stored: ValueKind,
        offered: ValueKind,
    },
    /// Some points needed new series beyond the engine's `max_series`. The other points of
    /// the write were stored, so a caller must not write the batch again.
    #[error(
        "partial write: max_series limit of {limit} series reached ({series} series exist); {rejected} point(s) of new series rejected, the first: {first}; {stored} point(s) of existing series stored. Raise [storage] max_series or drop a high-cardinality tag"
    )]
    SeriesLimit {
        limit: usize,
        series: usize,
        rejected: usize,
        stored: usize,
        first: String,
    },
    #[error("storage is shut down")]
    Closed,
    #[error("invalid query: {0}")]
    InvalidQuery(String),
}

/// A time-series store.
///
/// Durability contract: once `write` returns `Ok`, the points are on disk within the
/// backend's commit interval (see `commit_interval`), and `flush` returns only after
/// everything written before it is on disk.
pub trait TimeSeriesStore: Send + Sync + 'static {
    /// Stores points. Points may arrive out of order; a point with the same series and
    /// timestamp as a stored one replaces it.
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError>;

    /// Runs a range query.
    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError>;

    /// Returns the newest point of each series that matches `selector`. The server reads
    /// it at start to restore each device's latest values.
    // NOTE: backends that cannot list series return no points, so a server on them starts
    // without restored latest values.
    fn latest(
        &self,
        selector: &Selector,
    ) -> Result<Vec<(SeriesKey, Timestamp, Value)>, StorageError> {
        let _ = selector;
        Ok(Vec::new())
    }

    /// Lists the series that match a selector.
    fn series(&self, selector: &Selector) -> Result<Vec<SeriesKey>, StorageError>;

    /// Waits until every point written so far is on disk.
    fn flush(&self) -> Result<(), StorageError>;

    /// Deletes data older than `cutoff`, returning the number of points deleted.
    fn enforce_retention(&self, cutoff: Timestamp) -> Result<u64, StorageError>;

    /// The longest time between a successful `write` and its data reaching the disk.
    fn commit_interval(&self) -> Duration;
}
