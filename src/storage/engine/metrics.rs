//! Prometheus metrics of the engine.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges of one engine; clones share the same values.
#[derive(Clone, Debug, Default)]
pub struct EngineMetrics {
    pub points_written: Counter,
    pub points_dropped_retention: Counter,
    pub series: Gauge,
    pub segment_bytes: Gauge,
    pub wal_syncs: Counter,
    pub checkpoints: Counter,
    pub compactions: Counter,
    pub rollups: Counter,
    pub rollup_bytes: Gauge,
    pub backpressure_waits: Counter,
    pub background_errors: Counter,
    pub series_limit_rejected: Counter,
}

impl EngineMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "series_limit_rejected",
            "Points rejected because their new series would exceed [storage] max_series",
            self.series_limit_rejected.clone(),
        );
        let r = registry.sub_registry_with_prefix("storage_engine");
        r.register(
            "points_written",
            "Points stored",
            self.points_written.clone(),
        );
        r.register(
            "points_dropped_retention",
            "Points dropped because they are older than the retention floor",
            self.points_dropped_retention.clone(),
        );
        r.register("series", "Series in the index", self.series.clone());
        r.register(
            "segment_bytes",
            "Bytes of sealed segment files",
            self.segment_bytes.clone(),
        );
        r.register(
            "wal_syncs",
            "WAL fsync calls (group commits)",
            self.wal_syncs.clone(),
        );
        r.register(
            "checkpoints",
            "Memtables sealed into segments",
            self.checkpoints.clone(),
        );
        r.register(
            "compactions",
            "Partitions compacted",
            self.compactions.clone(),
        );
        r.register(
            "rollups",
            "Rollup segments written (one per partition and tier)",
            self.rollups.clone(),
        );
        r.register(
            "rollup_bytes",
            "Bytes of rollup segment files",
            self.rollup_bytes.clone(),
        );
        r.register(
            "backpressure_waits",
            "Writes that waited because the memory budget was full",
            self.backpressure_waits.clone(),
        );
        r.register(
            "background_errors",
            "Failed fsyncs, checkpoints or compactions; each is retried",
            self.background_errors.clone(),
        );
    }
}
