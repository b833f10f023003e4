//! The devices a server accepts data from, built from the config and replaced as a whole
//! when the config is reloaded, and the checks that turn decoded values into readings.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use super::payload::{RejectReason, Rejection, check_timestamp};
use crate::config::{Config, SiteKind};
use crate::model::{
    DeviceId, MetricName, ProfileName, Reading, SiteId, Source, Timestamp, Value, ValueKind,
};

/// What ingestion knows about one device.
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    pub id: DeviceId,
    pub site: SiteId,
    pub site_kind: SiteKind,
    pub profile: ProfileName,
    /// Metric names with their unit and kind, from the device's profile.
    pub metrics: HashMap<MetricName, (Option<String>, ValueKind)>,
    /// Time without a reading after which the device is marked offline.
    pub stale_after: Duration,
}

/// Known devices by id, plus the accepted timestamp window.
#[derive(Clone, Debug)]
pub struct Directory {
    devices: HashMap<DeviceId, Arc<DeviceEntry>>,
    /// Names of the loaded device profiles, which are the measurements of device readings.
    profiles: std::collections::HashSet<String>,
    max_age_ms: i64,
    max_skew_ms: i64,
}

impl Directory {
    pub fn from_config(config: &Config) -> Self {
        let mut devices = HashMap::new();
        for device in &config.devices {
            let Some(site) = config.site(&device.site) else {
                continue;
            };
            let Some(profile) = config.profiles.get(&device.profile) else {
                continue;
            };
            let metrics = profile
                .metrics
                .iter()
                .map(|m| (m.name.clone(), (m.unit.clone(), m.kind)))
                .collect();
            let entry = DeviceEntry {
                id: device.id.clone(),
                site: device.site.clone(),
                site_kind: site.kind,
                profile: device.profile.clone(),
                metrics,
                stale_after: device.stale_after,
            };
            devices.insert(device.id.clone(), Arc::new(entry));
        }
        Self {
            devices,
            profiles: config
                .profiles
                .names()
                .map(|name| name.as_str().to_owned())
                .collect(),
            max_age_ms: millis(config.ingest.max_age),
            max_skew_ms: millis(config.ingest.max_future_skew),
        }
    }

    pub fn device(&self, id: &DeviceId) -> Option<&Arc<DeviceEntry>> {
        self.devices.get(id)
    }

    /// Returns whether `measurement` is the name of a loaded device profile.
    pub fn is_profile(&self, measurement: &str) -> bool {
        self.profiles.contains(measurement)
    }

    pub fn devices(&self) -> impl Iterator<Item = &Arc<DeviceEntry>> {
        self.devices.values()
    }

    /// Finds the device a topic addresses, checking that it belongs to the topic's site.
    pub fn resolve(
        &self,
        site: &SiteId,
        device: &DeviceId,
    ) -> Result<&Arc<DeviceEntry>, Rejection> {
        let Some(entry) = self.devices.get(device) else {
            let reason = if self.devices.values().any(|d| d.site == *site) {
                RejectReason::UnknownDevice
            } else {
                RejectReason::UnknownSite
            };
            return Err(Rejection::new(
                reason,
                format!(
                    "device `{device}` at site `{site}` is not in the config; add it under [[devices]]"
                ),
            ));
        };
        if entry.site != *site {
            return Err(Rejection::new(
                RejectReason::SiteMismatch,
                format!(
                    "device `{device}` belongs to site `{}`, not `{site}`; publish to telemetry/{}/{device}",
                    entry.site, entry.site
                ),
            ));
        }
        Ok(entry)
    }

    /// Checks a reading's timestamp against the accepted window around `now`.
    pub fn check_timestamp(&self, ts: Timestamp, now: Timestamp) -> Result<(), Rejection> {
        check_timestamp(ts, now, self.max_age_ms, self.max_skew_ms)
    }

    /// Checks decoded values of one device, returning the readings that passed and a
    /// rejection for each value that did not.
    pub fn readings(
        &self,
        entry: &DeviceEntry,
        ts: Option<Timestamp>,
        values: Vec<(MetricName, Value)>,
        now: Timestamp,
        source: Source,
    ) -> Result<(Vec<Reading>, Vec<Rejection>), Rejection> {
        let ts = ts.unwrap_or(now);
        check_timestamp(ts, now, self.max_age_ms, self.max_skew_ms)?;
        let mut readings = Vec::with_capacity(values.len());
        let mut rejected = Vec::new();
        for (metric, value) in values {
            match check_value(entry, &metric, value) {
                Ok(value) => readings.push(Reading {
                    site: entry.site.clone(),
                    device: entry.id.clone(),
                    metric,
                    ts,
                    value,
                    source,
                }),
                Err(rejection) => rejected.push(rejection),
            }
        }
        Ok((readings, rejected))
    }
}

/// The directory in use, shared by the MQTT ingest link, the pipeline and the API.
///
/// A config reload replaces the whole directory at once. Readers take the current one with
/// [`SharedDirectory::load`] (a read lock and a reference count increment) and use it for a
/// whole message or batch, so one message is never checked against two configs.
#[derive(Clone, Debug)]
pub struct SharedDirectory(Arc<RwLock<Arc<Directory>>>);

impl SharedDirectory {
    pub fn new(directory: Directory) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(directory))))
    }

    /// Returns the current directory.
    pub fn load(&self) -> Arc<Directory> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the directory; readers holding the previous one finish with it.
    pub fn store(&self, directory: Directory) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(directory);
    }
}

/// Checks a value against its metric's kind. A number 0 or 1 for a boolean metric is
/// accepted, because many devices send flags as integers.
pub fn check_value(
    entry: &DeviceEntry,
    metric: &MetricName,
    value: Value,
) -> Result<Value, Rejection> {
    let Some((_, kind)) = entry.metrics.get(metric) else {
        let known: Vec<&str> = entry.metrics.keys().map(MetricName::as_str).collect();
        return Err(Rejection::new(
            RejectReason::UnknownMetric,
            format!(
                "device `{}` (profile `{}`) has no metric `{metric}`; known metrics: {}",
                entry.id,
                entry.profile,
                known.join(", ")
            ),
        ));
    };
    match (kind, value) {
        (ValueKind::Number, Value::Number(_)) | (ValueKind::Bool, Value::Bool(_)) => Ok(value),
        (ValueKind::Bool, Value::Number(n)) if n == 0.0 || n == 1.0 => Ok(Value::Bool(n == 1.0)),
        (ValueKind::Number, Value::Bool(_)) => Err(Rejection::new(
            RejectReason::WrongType,
            format!(
                "metric `{metric}` of device `{}` is a number; a boolean was sent",
                entry.id
            ),
        )),
        (ValueKind::Bool, Value::Number(n)) => Err(Rejection::new(
            RejectReason::WrongType,
            format!(
                "metric `{metric}` of device `{}` is a boolean; send true/false (or 1/0), not {n}",
                entry.id
            ),
        )),
    }
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
