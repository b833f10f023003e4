//! The pipeline task: takes readings and points from every source, keeps each device's
//! liveness and latest values, stores the data, and passes readings to the alarm stage.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alarms::manager::{AlarmCommand, AlarmHandle};
use crate::clock::SharedClock;
use crate::ingest::directory::{DeviceEntry, Directory, SharedDirectory};
use crate::ingest::{IngestMessage, LivenessCause, WriteFailure};
use crate::metrics::SharedRegistry;
use crate::model::{DeviceId, MetricName, Reading, Source, Timestamp, Value};
use crate::rules::engine::order_key;
use crate::storage::{Point, Selector, SeriesKey, StorageError, TimeSeriesStore};

/// Liveness and latest values of one device, as the API shows them.
#[derive(Clone, Debug, Default)]
pub struct DeviceState {
    /// `None` until the device reports or its staleness timeout passes.
    pub online: Option<bool>,
    pub last_seen: Option<Timestamp>,
    /// The latest value of each metric by ordering key
    /// ([`crate::rules::engine::order_key`]), with the reading's own timestamp.
    pub latest: BTreeMap<MetricName, (Timestamp, Value)>,
    /// Ordering key of each metric's entry in `latest`.
    pub latest_order: BTreeMap<MetricName, Timestamp>,
    /// Metrics whose `latest` entry was read from storage at start and not yet replaced by
    /// a received reading. Storage keeps the devices' own timestamps, so such an entry may
    /// not be the reading the server received last, and nothing may be decided on it.
    pub restored: BTreeSet<MetricName>,
    /// Polled metrics whose latest read failed or returned an invalid value. A reading of
    /// the metric removes its entry.
    pub bad: BTreeMap<MetricName, BadReading>,
}

/// Reason and server time of a metric's latest read that gave no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadReading {
    /// A reason label as in the `modbus_bad_values` and `modbus_errors` metrics, such as
    /// `timeout`, `exception_illegal_data_address`, `no_value` or `out_of_range`.
    pub reason: String,
    pub at: Timestamp,
}

/// Measurement with each device's liveness: field `online`, tags `site`, `device` and
/// `site_kind`. It is written on every change and every [`STATUS_INTERVAL`], so a
/// dashboard's time range always contains a recent value.
pub const DEVICE_STATUS_MEASUREMENT: &str = "device_status";

/// Measurements that only the server writes.
pub const RESERVED_MEASUREMENTS: [&str; 4] = [
    DEVICE_STATUS_MEASUREMENT,
    crate::alarms::manager::ALARM_EVENTS_MEASUREMENT,
    crate::alarms::manager::ALARM_STATE_MEASUREMENT,
    crate::summary::SITE_SUMMARY_MEASUREMENT,
];

/// Returns whether only the server writes `measurement`. Dashboards read alarm and device
/// state from these, so a client write to them could show a false state.
pub fn is_reserved_measurement(measurement: &str) -> bool {
    RESERVED_MEASUREMENTS.contains(&measurement)
}

/// How often every device's liveness is written to `device_status`.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(60);

/// Device states shared with the API.
pub type DeviceStates = Arc<RwLock<HashMap<DeviceId, DeviceState>>>;

/// Builds the storage key of a device's metric: measurement = profile, tags site, device and
/// site kind, field = metric.
pub fn series_key(entry: &DeviceEntry, metric: &MetricName) -> SeriesKey {
    SeriesKey::new(
        entry.profile.as_str(),
        vec![
            ("site".to_owned(), entry.site.to_string()),
            ("device".to_owned(), entry.id.to_string()),
            ("site_kind".to_owned(), entry.site_kind.as_str().to_owned()),
        ],
        metric.as_str(),
    )
}

/// Reads each configured device's latest stored values from `store`, for the device
/// states at start. `last_seen` becomes the newest of them, so the staleness timeout
/// counts from the last reading before the restart. Timestamps later than `now` (readings
/// dated in the future) are capped at `now` in the ordering keys and in `last_seen`.
pub fn restore_states(
    directory: &Directory,
    store: &dyn TimeSeriesStore,
    now: Timestamp,
) -> Result<HashMap<DeviceId, DeviceState>, StorageError> {
    let mut states = HashMap::new();
    for entry in directory.devices() {
        let selector = Selector {
            measurement: Some(entry.profile.as_str().to_owned()),
            tags: vec![
                ("site".to_owned(), entry.site.to_string()),
                ("device".to_owned(), entry.id.to_string()),
            ],
            field: None,
        };
        let mut state = DeviceState::default();
        for (series, ts, value) in store.latest(&selector)? {
            let metric = MetricName::new(series.field.as_str());
            let key = order_key(ts, now);
            state.latest.insert(metric.clone(), (ts, value));
            state.latest_order.insert(metric.clone(), key);
            state.restored.insert(metric);
            state.last_seen = Some(state.last_seen.map_or(key, |seen| seen.max(key)));
        }
        if state.last_seen.is_some() {
            states.insert(entry.id.clone(), state);
        }
    }
    Ok(states)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

struct PipelineMetrics {
    /// Messages that reached the pipeline: MQTT telemetry messages and Modbus polls with at
    /// least one reading, and HTTP write requests.
    messages: Family<SourceLabel, Counter>,
    readings: Family<SourceLabel, Counter>,
    points_stored: Counter,
    storage_failures: Counter,
    devices_online: Gauge,
    devices_offline: Gauge,
}

/// Everything the pipeline task needs.
pub struct Pipeline {
    /// Known devices with their staleness timeouts; replaced on config reload.
    pub directory: SharedDirectory,
    pub store: Arc<dyn TimeSeriesStore>,
    pub alarms: AlarmHandle,
    pub states: DeviceStates,
    pub clock: SharedClock,
}

impl Pipeline {
    /// Runs until the channel closes or `shutdown` is cancelled and the channel is drained,
    /// then flushes storage.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<IngestMessage>,
        registry: &SharedRegistry,
        shutdown: CancellationToken,
    ) {
        let metrics = self.register(registry);
        let started = self.clock.now();
        let mut status_ticker = tokio::time::interval(STATUS_INTERVAL);
        status_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(message) => self.handle(message, &metrics).await,
                    None => break,
                },
                _ = ticker.tick() => self.check_staleness(started, &metrics).await,
                _ = status_ticker.tick() => self.write_statuses(&metrics),
                () = shutdown.cancelled() => {
                    // Take what the sources already handed over, then stop.
                    rx.close();
                    while let Some(message) = rx.recv().await {
                        self.handle(message, &metrics).await;
                    }
                    break;
                }
            }
        }
        match self.store.flush() {
            Ok(()) => tracing::info!("storage flushed"),
            Err(e) => {
                tracing::error!(error = %e, "flushing storage at shutdown failed; recent readings may be lost");
            }
        }
    }

    fn register(&self, registry: &SharedRegistry) -> PipelineMetrics {
        let metrics = PipelineMetrics {
            messages: Family::default(),
            readings: Family::default(),
            points_stored: Counter::default(),
            storage_failures: Counter::default(),
            devices_online: Gauge::default(),
            devices_offline: Gauge::default(),
        };
        registry.register(|r| {
            r.register(
                "messages_received",
                "MQTT telemetry messages, Modbus polls and HTTP write requests that reached the pipeline, by source",
                metrics.messages.clone(),
            );
            r.register("readings_received", "Readings accepted, by source", metrics.readings.clone());
            r.register("points_stored", "Points handed to storage", metrics.points_stored.clone());
            r.register("storage_failures", "Storage writes that failed", metrics.storage_failures.clone());
            r.register("devices_online", "Devices currently online", metrics.devices_online.clone());
            r.register("devices_offline", "Devices currently offline", metrics.devices_offline.clone());
        });
        metrics
    }

    async fn handle(&self, message: IngestMessage, metrics: &PipelineMetrics) {
        match message {
            IngestMessage::Readings(readings) => {
                self.count_message(&readings, metrics);
                let _ = self.readings(readings, Storage::Store, metrics).await;
            }
            IngestMessage::UnstoredReadings(readings) => {
                self.count_message(&readings, metrics);
                let _ = self.readings(readings, Storage::Skip, metrics).await;
            }
            IngestMessage::Points { points, done } => {
                let source = SourceLabel {
                    source: source_name(Source::HttpWrite).to_owned(),
                };
                metrics.messages.get_or_create(&source).inc();
                let result = self.points(points, metrics).await;
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
            IngestMessage::BadReadings { device, bad } => self.bad_readings(device, bad),
            IngestMessage::Liveness {
                device,
                online,
                cause,
            } => {
                self.set_liveness(&device, online, &cause, metrics).await;
            }
        }
    }

    /// Counts one received message for the source of `readings`. Every source sends the
    /// readings of one message or poll together. A poll whose values report-on-change
    /// partly holds back arrives as two messages, one stored and one not.
    fn count_message(&self, readings: &[Reading], metrics: &PipelineMetrics) {
        if let Some(first) = readings.first() {
            let source = SourceLabel {
                source: source_name(first.source).to_owned(),
            };
            metrics.messages.get_or_create(&source).inc();
        }
    }

    async fn readings(
        &self,
        readings: Vec<Reading>,
        storage: Storage,
        metrics: &PipelineMetrics,
    ) -> Result<(), WriteFailure> {
        if readings.is_empty() {
            return Ok(());
        }
        let mut points = Vec::with_capacity(readings.len());
        let mut came_online = Vec::new();
        let directory = self.directory.load();
        let received = self.clock.now();
        {
            let mut states = self
                .states
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for reading in &readings {
                let Some(entry) = directory.device(&reading.device) else {
                    continue;
                };
                metrics
                    .readings
                    .get_or_create(&SourceLabel {
                        source: source_name(reading.source).to_owned(),
                    })
                    .inc();
                if storage == Storage::Store {
                    points.push(Point {
                        series: series_key(entry, &reading.metric),
                        ts: reading.ts,
                        value: reading.value,
                    });
                }
                let state = states.entry(reading.device.clone()).or_default();
                // Set under the same lock as the latest values, so the API shows a new
                // reading and the device online together.
                if state.online != Some(true) {
                    state.online = Some(true);
                    came_online.push(reading.device.clone());
                }
                // Server time, so a device clock running ahead cannot keep it online.
                state.last_seen = Some(received);
                // Ordered like the rules see readings, so one dated in the future cannot
                // hide the readings after it.
                let key = order_key(reading.ts, received);
                let newer = state
                    .latest_order
                    .get(&reading.metric)
                    .is_none_or(|last| *last <= key);
                if newer {
                    state
                        .latest
                        .insert(reading.metric.clone(), (reading.ts, reading.value));
                    state.latest_order.insert(reading.metric.clone(), key);
                    state.restored.remove(&reading.metric);
                }
                state.bad.remove(&reading.metric);
            }
        }
        let stored = if points.is_empty() {
            Ok(())
        } else {
            self.store_points(points, metrics)
        };
        if !came_online.is_empty() {
            self.update_gauges(metrics);
        }
        for device in came_online {
            self.announce_liveness(&device, true, &LivenessCause::Reading, metrics)
                .await;
        }
        // Rules run on readings even when storage failed: an alarm must not wait for a disk.
        let _ = self
            .alarms
            .send(AlarmCommand::Readings { readings, received })
            .await;
        stored
    }

    fn bad_readings(&self, device: DeviceId, bad: Vec<(MetricName, String)>) {
        if self.directory.load().device(&device).is_none() {
            return;
        }
        let at = self.clock.now();
        let mut states = self
            .states
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = states.entry(device).or_default();
        for (metric, reason) in bad {
            state.bad.insert(metric, BadReading { reason, at });
        }
    }

    fn store_points(
        &self,
        points: Vec<Point>,
        metrics: &PipelineMetrics,
    ) -> Result<(), WriteFailure> {
        let count = points.len() as u64;
        match self.store.write(points.clone()) {
            Ok(()) => {
                metrics.points_stored.inc_by(count);
                Ok(())
            }
            // A backend rejects a whole batch for one conflicting point, so the batch is
            // written again point by point to keep every point that does not conflict.
            Err(StorageError::KindMismatch { .. }) => self.store_each(points, metrics),
            // The engine stored the points of existing series and counted and logged the others.
            Err(e @ StorageError::SeriesLimit { stored, .. }) => {
                metrics.points_stored.inc_by(stored as u64);
                Err(WriteFailure::SeriesLimit(e.to_string()))
            }
            Err(e) => {
                metrics.storage_failures.inc();
                tracing::error!(error = %e, points = count, "storing readings failed");
                Err(WriteFailure::Storage(e.to_string()))
            }
        }
    }

    fn store_each(
        &self,
        points: Vec<Point>,
        metrics: &PipelineMetrics,
    ) -> Result<(), WriteFailure> {
        let mut first_conflict = None;
        let mut conflicts = 0u64;
        let mut stored = 0usize;
        // The first series-limit error, with `rejected` summed over every point.
        let mut series_limit: Option<StorageError> = None;
        for point in points {
            match self.store.write(vec![point]) {
                Ok(()) => {
                    metrics.points_stored.inc();
                    stored += 1;
                }
                Err(e @ StorageError::KindMismatch { .. }) => {
                    conflicts += 1;
                    first_conflict.get_or_insert_with(|| e.to_string());
                }
                Err(e @ StorageError::SeriesLimit { .. }) => match &mut series_limit {
                    Some(StorageError::SeriesLimit { rejected, .. }) => *rejected += 1,
                    _ => series_limit = Some(e),
                },
                Err(e) => {
                    metrics.storage_failures.inc();
                    tracing::error!(error = %e, "storing readings failed");
                    return Err(WriteFailure::Storage(e.to_string()));
                }
            }
        }
        if let Some(StorageError::SeriesLimit { stored: total, .. }) = &mut series_limit {
            *total = stored;
        }
        let series_limit = series_limit.map(|e| e.to_string());
        match (first_conflict, series_limit) {
            (None, None) => Ok(()),
            (None, Some(limit)) => Err(WriteFailure::SeriesLimit(limit)),
            (Some(message), limit) => {
                let also = limit.map(|l| format!("; also: {l}")).unwrap_or_default();
                Err(WriteFailure::Conflict(format!(
                    "{conflicts} point(s) not stored: {message}{also}"
                )))
            }
        }
    }

    /// Stores points written over HTTP. Points of a known device's profile measurement and
    /// `device` tag become readings, so rules apply to them; the rest are stored as they are.
    async fn points(
        &self,
        points: Vec<Point>,
        metrics: &PipelineMetrics,
    ) -> Result<(), WriteFailure> {
        let mut readings = Vec::new();
        let mut other = Vec::new();
        let mut rejected = Vec::new();
        let directory = self.directory.load();
        for point in points {
            match self.as_reading(&directory, &point) {
                DevicePoint::Reading(reading) => readings.push(reading),
                DevicePoint::Other => other.push(point),
                DevicePoint::Rejected(rejection) => rejected.push(rejection),
            }
        }
        let stored = if other.is_empty() {
            Ok(())
        } else {
            self.store_points(other, metrics)
        };
        let readings_stored = self.readings(readings, Storage::Store, metrics).await;
        let checked = match rejected.first() {
            None => Ok(()),
            Some(first) => Err(WriteFailure::Rejected(format!(
                "{} point(s) rejected; the first: {}",
                rejected.len(),
                first.message
            ))),
        };
        stored.and(readings_stored).and(checked)
    }

    /// Classifies a written point. A point of a configured device's profile measurement
    /// passes the same checks as MQTT telemetry (site, metric, kind, timestamp window), so
    /// it cannot add readings the device never sent or drive its rules with bad data.
    fn as_reading(&self, directory: &Directory, point: &Point) -> DevicePoint {
        use crate::ingest::payload::{RejectReason, Rejection};

        if is_reserved_measurement(&point.series.measurement) {
            return DevicePoint::Rejected(Rejection::new(
                RejectReason::ReservedMeasurement,
                format!(
                    "measurement `{}` is written only by the server; write device readings under the device's profile instead",
                    point.series.measurement
                ),
            ));
        }
        let Some(device) = point.series.tag("device").map(DeviceId::new) else {
            return DevicePoint::Other;
        };
        let Some(entry) = directory.device(&device) else {
            if !directory.is_profile(&point.series.measurement) {
                return DevicePoint::Other;
            }
            // Under a profile's measurement the point would look like a reading of a device,
            // without the device's checks, as MQTT rejects it too.
            return DevicePoint::Rejected(Rejection::new(
                RejectReason::UnknownDevice,
                format!(
                    "device `{device}` is not configured; add it to the config or through the device API before \
                     writing `{}` points for it",
                    point.series.measurement
                ),
            ));
        };
        if entry.profile.as_str() != point.series.measurement {
            return DevicePoint::Rejected(Rejection::new(
                RejectReason::ProfileMismatch,
                format!(
                    "device `{device}` has profile `{}`, so its points need measurement `{}`, not `{}`",
                    entry.profile, entry.profile, point.series.measurement
                ),
            ));
        }
        if let Some(site) = point
            .series
            .tag("site")
            .filter(|s| *s != entry.site.as_str())
        {
            return DevicePoint::Rejected(crate::ingest::payload::Rejection::new(
                crate::ingest::payload::RejectReason::SiteMismatch,
                format!(
                    "device `{device}` belongs to site `{}`, not `{site}`",
                    entry.site
                ),
            ));
        }
        let metric = MetricName::new(point.series.field.as_str());
        let checked =
            crate::ingest::directory::check_value(entry, &metric, point.value).and_then(|value| {
                directory
                    .check_timestamp(point.ts, self.clock.now())
                    .map(|()| value)
            });
        match checked {
            Ok(value) => DevicePoint::Reading(Reading {
                site: entry.site.clone(),
                device,
                metric,
                ts: point.ts,
                value,
                source: Source::HttpWrite,
            }),
            Err(rejection) => DevicePoint::Rejected(rejection),
        }
    }

    async fn set_liveness(
        &self,
        device: &DeviceId,
        online: bool,
        cause: &LivenessCause,
        metrics: &PipelineMetrics,
    ) {
        let changed = {
            let mut states = self
                .states
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let state = states.entry(device.clone()).or_default();
            let changed = state.online != Some(online);
            state.online = Some(online);
            if online && matches!(cause, LivenessCause::StatusMessage) {
                state.last_seen = Some(self.clock.now());
            }
            changed
        };
        self.update_gauges(metrics);
        if changed {
            self.announce_liveness(device, online, cause, metrics).await;
        }
    }

    /// Stores, logs and sends to the alarm stage a liveness change that is already recorded
    /// in `states`.
    async fn announce_liveness(
        &self,
        device: &DeviceId,
        online: bool,
        cause: &LivenessCause,
        metrics: &PipelineMetrics,
    ) {
        if let Some(point) = self.status_point(&self.directory.load(), device, online) {
            let _ = self.store_points(vec![point], metrics);
        }
        let cause_text = describe(cause);
        tracing::info!(device = %device, online, cause = %cause_text, "device {}", if online { "online" } else { "offline" });
        let _ = self
            .alarms
            .send(AlarmCommand::Liveness {
                device: device.clone(),
                online,
                at: self.clock.now(),
                cause: cause_text,
            })
            .await;
    }

    fn status_point(
        &self,
        directory: &Directory,
        device: &DeviceId,
        online: bool,
    ) -> Option<Point> {
        let entry = directory.device(device)?;
        let mut series = series_key(entry, &MetricName::from("online"));
        series.measurement = DEVICE_STATUS_MEASUREMENT.to_owned();
        Some(Point {
            series,
            ts: self.clock.now(),
            value: Value::Bool(online),
        })
    }

    /// Writes the liveness of every device whose state is known.
    fn write_statuses(&self, metrics: &PipelineMetrics) {
        let directory = self.directory.load();
        let points: Vec<Point> = {
            let states = self
                .states
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            states
                .iter()
                .filter_map(|(device, state)| self.status_point(&directory, device, state.online?))
                .collect()
        };
        if !points.is_empty() {
            let _ = self.store_points(points, metrics);
        }
    }

    async fn check_staleness(&self, started: Timestamp, metrics: &PipelineMetrics) {
        let now = self.clock.now();
        let directory = self.directory.load();
        let stale: Vec<DeviceId> = {
            let states = self
                .states
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            directory
                .devices()
                .filter(|entry| {
                    let state = states.get(&entry.id);
                    let since = state.and_then(|s| s.last_seen).unwrap_or(started);
                    let online = state.and_then(|s| s.online) != Some(false);
                    let timeout_ms =
                        i64::try_from(entry.stale_after.as_millis()).unwrap_or(i64::MAX);
                    online && now.0.saturating_sub(since.0) > timeout_ms
                })
                .map(|entry| entry.id.clone())
                .collect()
        };
        for device in stale {
            self.set_liveness(&device, false, &LivenessCause::Stale, metrics)
                .await;
        }
    }

    fn update_gauges(&self, metrics: &PipelineMetrics) {
        let states = self
            .states
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let online = states.values().filter(|s| s.online == Some(true)).count();
        let offline = states.values().filter(|s| s.online == Some(false)).count();
        metrics
            .devices_online
            .set(i64::try_from(online).unwrap_or(i64::MAX));
        metrics
            .devices_offline
            .set(i64::try_from(offline).unwrap_or(i64::MAX));
    }
}

/// Whether the pipeline stores a batch of readings or only evaluates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    Store,
    /// Update latest values and liveness and run the rules, but write nothing.
    Skip,
}

/// Classification of a written point.
enum DevicePoint {
    /// A reading of a configured device, checked like MQTT telemetry.
    Reading(Reading),
    /// Not a device reading: stored as written.
    Other,
    /// A point of a configured device that failed a check.
    Rejected(crate::ingest::payload::Rejection),
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Mqtt => "mqtt",
        Source::Modbus => "modbus",
        Source::HttpWrite => "http_write",
    }
}

fn describe(cause: &LivenessCause) -> String {
    match cause {
        LivenessCause::StatusMessage => "status message".to_owned(),
        LivenessCause::Stale => "no reading within the staleness timeout".to_owned(),
        LivenessCause::PollFailures(n) => format!("{n} consecutive poll failures"),
        LivenessCause::Reading => "reading received".to_owned(),
    }
}
