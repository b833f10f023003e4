//! Shared helpers for the InfluxQL, Grafana and client tests: an in-memory
//! `TimeSeriesStore`, demo-like data, and a real HTTP server on an ephemeral port.
//!
//! Included by other test files with `#[path = "influxql_support.rs"] mod support;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stonelion::model::{Timestamp, Value, ValueKind};
use stonelion::storage::{
    Aggregate, Point, Query, Selector, SeriesData, SeriesKey, StorageError, TimeSeriesStore,
};

/// Stored points of one series, by millisecond timestamp, with the series' value kind.
type StoredSeries = (ValueKind, BTreeMap<i64, Value>);

/// A store that keeps every series in memory. It serves raw queries, and aggregated
/// ones per step aligned to the Unix epoch, as the storage trait defines them.
#[derive(Default)]
pub struct MemStore {
    series: Mutex<BTreeMap<SeriesKey, StoredSeries>>,
    /// Number of aggregated queries served.
    aggregated_queries: AtomicUsize,
}

impl MemStore {
    pub fn new() -> Arc<MemStore> {
        Arc::new(MemStore::default())
    }

    /// Number of aggregated queries served so far.
    pub fn aggregated_queries(&self) -> usize {
        self.aggregated_queries.load(Ordering::SeqCst)
    }
}

/// Aggregates time-ordered points per step aligned to the Unix epoch, keeping the
/// value kind for `min`, `max`, `first` and `last`, as the embedded engine does.
fn aggregate_steps(
    points: &[(Timestamp, Value)],
    kind: ValueKind,
    step_ms: i64,
    aggregate: Aggregate,
) -> Vec<(Timestamp, Value)> {
    let mut steps: Vec<(i64, Vec<f64>)> = Vec::new();
    for (ts, value) in points {
        let start = ts.0 - ts.0.rem_euclid(step_ms);
        match steps.last_mut() {
            Some((last, values)) if *last == start => values.push(value.as_f64()),
            _ => steps.push((start, vec![value.as_f64()])),
        }
    }
    let keep_kind = |v: f64| match kind {
        ValueKind::Bool => Value::Bool(v != 0.0),
        ValueKind::Number => Value::Number(v),
    };
    steps
        .into_iter()
        .map(|(start, values)| {
            let mut sum = values[0];
            for v in &values[1..] {
                sum += v;
            }
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let value = match aggregate {
                Aggregate::Mean => Value::Number(sum / values.len() as f64),
                Aggregate::Sum => Value::Number(sum),
                Aggregate::Count => Value::Number(values.len() as f64),
                Aggregate::Min => keep_kind(min),
                Aggregate::Max => keep_kind(max),
                Aggregate::First => keep_kind(values[0]),
                Aggregate::Last => keep_kind(values[values.len() - 1]),
            };
            (Timestamp(start), value)
        })
        .collect()
}

impl TimeSeriesStore for MemStore {
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError> {
        let mut series = self.series.lock().expect("store lock");
        for point in points {
            let entry = series
                .entry(point.series.clone())
                .or_insert_with(|| (point.value.kind(), BTreeMap::new()));
            if entry.0 != point.value.kind() {
                return Err(StorageError::KindMismatch {
                    series: format!("{:?}", point.series),
                    stored: entry.0,
                    offered: point.value.kind(),
                });
            }
            entry.1.insert(point.ts.0, point.value);
        }
        Ok(())
    }

    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        if query.aggregation.is_some() {
            self.aggregated_queries.fetch_add(1, Ordering::SeqCst);
        }
        let series = self.series.lock().expect("store lock");
        let mut out = Vec::new();
        for (key, (kind, points)) in series.iter() {
            if !query.selector.matches(key) {
                continue;
            }
            let mut points: Vec<(Timestamp, Value)> = points
                .range(query.from.0..query.to.0.max(query.from.0))
                .map(|(ts, v)| (Timestamp(*ts), *v))
                .collect();
            if let Some((step, aggregate)) = query.aggregation {
                let step_ms = i64::try_from(step.as_millis()).expect("step in range");
                points = aggregate_steps(&points, *kind, step_ms, aggregate);
            }
            points.truncate(query.limit.unwrap_or(usize::MAX));
            if !points.is_empty() {
                out.push(SeriesData {
                    series: key.clone(),
                    kind: *kind,
                    points,
                });
            }
        }
        Ok(out)
    }

    fn series(&self, selector: &Selector) -> Result<Vec<SeriesKey>, StorageError> {
        let series = self.series.lock().expect("store lock");
        Ok(series
            .keys()
            .filter(|k| selector.matches(k))
            .cloned()
            .collect())
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn enforce_retention(&self, cutoff: Timestamp) -> Result<u64, StorageError> {
        let mut series = self.series.lock().expect("store lock");
        let mut deleted = 0;
        for (_, points) in series.values_mut() {
            let kept = points.split_off(&cutoff.0);
            deleted += points.len() as u64;
            *points = kept;
        }
        Ok(deleted)
    }

    fn commit_interval(&self) -> Duration {
        Duration::ZERO
    }
}

/// Builds a point of the shared schema.
pub fn point(
    measurement: &str,
    tags: &[(&str, &str)],
    field: &str,
    ts_ms: i64,
    value: Value,
) -> Point {
    let tags = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Point {
        series: SeriesKey::new(measurement, tags, field),
        ts: Timestamp(ts_ms),
        value,
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One device of the demo data.
pub struct DemoDevice {
    pub site: &'static str,
    pub site_kind: &'static str,
    pub device: &'static str,
    pub profile: &'static str,
}

pub const DEMO_DEVICES: [DemoDevice; 6] = [
    DemoDevice {
        site: "plant-a",
        site_kind: "enterprise",
        device: "gas-01",
        profile: "gas-detector",
    },
    DemoDevice {
        site: "plant-a",
        site_kind: "enterprise",
        device: "gas-02",
        profile: "gas-detector",
    },
    DemoDevice {
        site: "plant-a",
        site_kind: "enterprise",
        device: "meter-01",
        profile: "energy-meter",
    },
    DemoDevice {
        site: "park-b",
        site_kind: "park_building",
        device: "smoke-01",
        profile: "smoke-detector",
    },
    DemoDevice {
        site: "park-b",
        site_kind: "park_building",
        device: "temp-01",
        profile: "temperature-sensor",
    },
    DemoDevice {
        site: "park-b",
        site_kind: "park_building",
        device: "gas-03",
        profile: "gas-detector",
    },
];

/// Writes two hours of one-minute readings ending now for every demo device, device
/// status, alarm events and alarm state, as the server writes them.
pub fn seed_demo(store: &dyn TimeSeriesStore) {
    let end = now_ms() - now_ms() % 60_000;
    let mut points = Vec::new();
    for (d, device) in DEMO_DEVICES.iter().enumerate() {
        let tags = [
            ("site", device.site),
            ("device", device.device),
            ("site_kind", device.site_kind),
        ];
        for minute in 0..120_i64 {
            let ts = end - (119 - minute) * 60_000;
            let phase = minute as f64 + d as f64 * 7.0;
            for (field, value) in demo_fields(device.profile, minute, phase) {
                points.push(point(device.profile, &tags, field, ts, value));
            }
            let online = !(device.device == "gas-02" && minute >= 100);
            points.push(point(
                "device_status",
                &tags,
                "online",
                ts,
                Value::Bool(online),
            ));
        }
    }
    points.extend(demo_alarms(end));
    store.write(points).expect("seed demo data");
}

fn demo_fields(profile: &str, minute: i64, phase: f64) -> Vec<(&'static str, Value)> {
    match profile {
        "gas-detector" => vec![(
            "gas_lel",
            Value::Number(10.0 + 30.0 * (phase / 20.0).sin().abs()),
        )],
        "smoke-detector" => vec![("smoke", Value::Bool(minute % 50 == 0))],
        "energy-meter" => vec![
            ("energy_kwh", Value::Number(1000.0 + minute as f64 * 0.8)),
            ("power_kw", Value::Number(48.0 + (phase / 9.0).cos() * 4.0)),
        ],
        "temperature-sensor" => vec![("temperature_c", Value::Number(21.5 + (phase / 30.0).sin()))],
        other => panic!("no demo fields for profile {other}"),
    }
}

fn demo_alarms(end: i64) -> Vec<stonelion::storage::Point> {
    let events = [
        (
            "plant-a",
            "gas-01",
            "gas-high",
            "alarm.raised",
            1.0,
            27.5,
            90,
        ),
        (
            "plant-a",
            "gas-01",
            "gas-high",
            "alarm.escalated",
            2.0,
            51.0,
            80,
        ),
        (
            "plant-a",
            "gas-01",
            "gas-high",
            "alarm.acknowledged",
            2.0,
            48.0,
            70,
        ),
        (
            "plant-a",
            "gas-01",
            "gas-high",
            "alarm.cleared",
            0.0,
            12.0,
            40,
        ),
        ("park-b", "smoke-01", "smoke", "alarm.raised", 2.0, 1.0, 30),
        (
            "plant-a",
            "gas-02",
            "offline",
            "device.offline",
            1.0,
            0.0,
            19,
        ),
    ];
    let mut points = Vec::new();
    for (site, device, rule, event, level, value, minutes_ago) in events {
        let ts = end - minutes_ago * 60_000;
        let tags = [
            ("site", site),
            ("device", device),
            ("rule", rule),
            ("event", event),
        ];
        points.push(point(
            "alarm_events",
            &tags,
            "level",
            ts,
            Value::Number(level),
        ));
        points.push(point(
            "alarm_events",
            &tags,
            "value",
            ts,
            Value::Number(value),
        ));
        let state_tags = [("site", site), ("device", device), ("rule", rule)];
        let state_level = if event == "alarm.cleared" { 0.0 } else { level };
        points.push(point(
            "alarm_state",
            &state_tags,
            "level",
            ts,
            Value::Number(state_level),
        ));
    }
    points
}

/// Serves a router on 127.0.0.1 with an ephemeral port and returns its address.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("test server runs");
    });
    addr
}

/// Starts the InfluxQL router over `store` and returns its base URL.
pub async fn serve_influxql(store: Arc<dyn TimeSeriesStore>) -> String {
    let addr = serve(stonelion::api::influxql::router(store)).await;
    format!("http://{addr}")
}

/// Starts the InfluxQL router over `store` with `limits` and returns its base URL.
pub async fn serve_influxql_with_limits(
    store: Arc<dyn TimeSeriesStore>,
    limits: stonelion::api::influxql::QueryLimits,
) -> String {
    let addr = serve(stonelion::api::influxql::router_with_limits(store, limits)).await;
    format!("http://{addr}")
}

/// Runs `q` with `GET /query` and returns the status and parsed body.
pub async fn get_query(base: &str, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(format!("{base}/query"))
        .query(params)
        .send()
        .await
        .expect("query request");
    let status = response.status().as_u16();
    let body = response.json().await.expect("JSON body");
    (status, body)
}
