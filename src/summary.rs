//! The site summary task: every `[storage] summary_interval` it writes one point per
//! site and field to the measurement `site_summary` with the site's device count, online
//! devices and open alarms.
//!
//! Dashboards read current state from it with `last()` over any time range that is
//! longer than the interval. `alarm_state` cannot serve that purpose: it is written only
//! at an alarm's transitions, so an alarm raised before the range starts and still active
//! has no point in the range. Online counts from `device_status` would need `mean()` over
//! a boolean field, which InfluxDB rejects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alarms::store::{OpenAlarmCounts, open_alarm_counts};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::model::{SiteId, Timestamp, Value};
use crate::pipeline::DeviceStates;
use crate::storage::{Point, SeriesKey, TimeSeriesStore};

/// Measurement of the site summary, with tags `site` and `site_kind`.
pub const SITE_SUMMARY_MEASUREMENT: &str = "site_summary";

/// One site's counts at one time.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSummary {
    pub site: SiteId,
    /// `enterprise` or `park_building`.
    pub site_kind: &'static str,
    /// Devices configured for the site.
    pub devices_total: u64,
    /// Devices whose last known liveness is online. A device that has not reported since
    /// the server started counts as not online.
    pub devices_online: u64,
    pub alarms: OpenAlarmCounts,
}

impl SiteSummary {
    /// Builds the points of the summary at `ts`. The field `devices_online_ratio`
    /// (`devices_online / devices_total`) is left out for a site without devices.
    pub fn points(&self, ts: Timestamp) -> Vec<Point> {
        let tags = vec![
            ("site".to_owned(), self.site.to_string()),
            ("site_kind".to_owned(), self.site_kind.to_owned()),
        ];
        let counts = [
            ("devices_total", self.devices_total),
            ("devices_online", self.devices_online),
            ("alarms_active_level1", self.alarms.active_level1),
            ("alarms_active_level2", self.alarms.active_level2),
            ("alarms_unacknowledged", self.alarms.unacknowledged),
        ];
        let mut fields: Vec<(&str, f64)> = counts
            .iter()
            .map(|(name, count)| (*name, *count as f64))
            .collect();
        if self.devices_total > 0 {
            fields.push((
                "devices_online_ratio",
                self.devices_online as f64 / self.devices_total as f64,
            ));
        }
        fields
            .into_iter()
            .map(|(field, value)| Point {
                series: SeriesKey::new(SITE_SUMMARY_MEASUREMENT, tags.clone(), field),
                ts,
                value: Value::Number(value),
            })
            .collect()
    }
}

/// Counts devices and open alarms for every configured site, in config order.
pub fn summarize(
    config: &Config,
    states: &DeviceStates,
    alarms: &HashMap<SiteId, OpenAlarmCounts>,
) -> Vec<SiteSummary> {
    let states = states
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    config
        .sites
        .iter()
        .map(|site| {
            let devices: Vec<_> = config
                .devices
                .iter()
                .filter(|d| d.site == site.id)
                .collect();
            let online = devices
                .iter()
                .filter(|d| states.get(&d.id).and_then(|s| s.online) == Some(true))
                .count();
            SiteSummary {
                site: site.id.clone(),
                site_kind: site.kind.as_str(),
                devices_total: devices.len() as u64,
                devices_online: online as u64,
                alarms: alarms.get(&site.id).copied().unwrap_or_default(),
            }
        })
        .collect()
}

/// Inputs and output of the site summary task.
pub struct SummaryTask {
    pub config: Arc<Config>,
    pub states: DeviceStates,
    /// A read connection to the state database, shared with the API.
    pub alarm_reader: Arc<Mutex<rusqlite::Connection>>,
    pub store: Arc<dyn TimeSeriesStore>,
    pub clock: SharedClock,
}

impl SummaryTask {
    /// Counts devices and open alarms now, writes one summary per site to the store, and
    /// returns the number of points written. Blocks on SQLite and the store, so async
    /// callers run it on a blocking thread.
    pub fn write_once(&self) -> anyhow::Result<usize> {
        let alarms = {
            let conn = self
                .alarm_reader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            open_alarm_counts(&conn)?
        };
        let now = self.clock.now();
        let points: Vec<Point> = summarize(&self.config, &self.states, &alarms)
            .iter()
            .flat_map(|s| s.points(now))
            .collect();
        let count = points.len();
        if !points.is_empty() {
            self.store.write(points)?;
        }
        Ok(count)
    }

    /// Writes the summary at once and then every `interval` until `stop` is cancelled.
    pub fn spawn(self, interval: Duration, stop: CancellationToken) -> JoinHandle<()> {
        let task = Arc::new(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures: u64 = 0;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let task = task.clone();
                match tokio::task::spawn_blocking(move || task.write_once()).await {
                    Ok(Ok(_)) => {
                        if failures > 0 {
                            tracing::info!(
                                failures,
                                "writing the site summary succeeded after failures"
                            );
                        }
                        failures = 0;
                    }
                    Ok(Err(e)) => {
                        failures += 1;
                        // Log the first failure and then every 60th, so a full disk does not
                        // flood the log every interval.
                        if failures % 60 == 1 {
                            tracing::error!(error = %e, failures, "writing the site summary failed, so dashboards show stale counts; check the storage backend");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "writing the site summary panicked"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use super::*;
    use crate::alarms::store::{AlarmStore, open_connection};
    use crate::alarms::{Alarm, AlarmId, AlarmKind, AlarmState, EventKind, Signoff, Transition};
    use crate::clock::ManualClock;
    use crate::config::builtin::builtin_profiles;
    use crate::model::{DeviceId, RuleId};
    use crate::pipeline::DeviceState;
    use crate::storage::sqlite::SqliteStore;
    use crate::storage::{Query, Selector};

    const CONFIG: &str = r#"
[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[sites]]
id = "park-b3"
name = "Building B3"
kind = "park_building"

[[sites]]
id = "empty"
name = "No devices yet"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "gas-02"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "meter-01"
site = "plant-a"
profile = "energy-meter"

[[devices]]
id = "smoke-01"
site = "park-b3"
profile = "smoke-detector"
"#;

    const DAY_MS: i64 = 24 * 3600 * 1000;

    fn alarm(device: &str, site: &str, rule: &str, level: u8, raised_at: Timestamp) -> Alarm {
        Alarm {
            id: AlarmId(0),
            rule: RuleId::from(rule),
            kind: AlarmKind::Rule,
            site: SiteId::from(site),
            device: DeviceId::from(device),
            metric: None,
            unit: None,
            level,
            state: AlarmState::Active,
            acknowledged: None,
            closed: None,
            value: Some(60.0),
            threshold: None,
            raised_at,
            updated_at: raised_at,
            cleared_at: None,
            description: String::new(),
            history: Vec::new(),
        }
    }

    fn raised(at: Timestamp, level: u8) -> Transition {
        Transition {
            event: EventKind::Raised,
            at,
            actor: "rule:test".to_owned(),
            level,
            value: Some(60.0),
            note: None,
        }
    }

    fn stored(store: &SqliteStore, site: &str, field: &str) -> Vec<(Timestamp, Value)> {
        let query = Query {
            selector: Selector {
                measurement: Some(SITE_SUMMARY_MEASUREMENT.to_owned()),
                tags: vec![("site".to_owned(), site.to_owned())],
                field: Some(field.to_owned()),
            },
            from: Timestamp(0),
            to: Timestamp(i64::MAX),
            aggregation: None,
            limit: None,
        };
        store
            .query(&query)
            .unwrap()
            .into_iter()
            .flat_map(|s| s.points)
            .collect()
    }

    #[test]
    fn summary_counts_old_alarms_and_online_devices() {
        let dir = tempfile::tempdir().unwrap();
        let state_db = dir.path().join("state.sqlite");
        let now = Timestamp(1_800_000_000_000);

        // A level 2 alarm raised two days ago and still active, an acknowledged level 1
        // alarm, a cleared alarm not acknowledged, and a closed alarm.
        let mut alarms = AlarmStore::open(&state_db, Vec::new()).unwrap();
        let old = Timestamp(now.0 - 2 * DAY_MS);
        alarms
            .insert(
                alarm("gas-01", "plant-a", "gas-lel", 2, old),
                raised(old, 2),
            )
            .unwrap();
        let (mut acknowledged, _) = alarms
            .insert(
                alarm("gas-02", "plant-a", "gas-lel", 1, now),
                raised(now, 1),
            )
            .unwrap();
        acknowledged.acknowledged = Some(Signoff {
            by: "duty officer".to_owned(),
            at: now,
            note: None,
        });
        let mut ack = raised(now, 1);
        ack.event = EventKind::Acknowledged;
        alarms.update(&mut acknowledged, ack).unwrap();
        let (mut cleared, _) = alarms
            .insert(
                alarm("smoke-01", "park-b3", "smoke", 2, now),
                raised(now, 2),
            )
            .unwrap();
        cleared.state = AlarmState::Cleared;
        let mut clear = raised(now, 2);
        clear.event = EventKind::Cleared;
        alarms.update(&mut cleared, clear).unwrap();
        let (mut closed, _) = alarms
            .insert(
                alarm("meter-01", "plant-a", "power", 1, now),
                raised(now, 1),
            )
            .unwrap();
        closed.state = AlarmState::Closed;
        closed.acknowledged = Some(Signoff {
            by: "duty officer".to_owned(),
            at: now,
            note: None,
        });
        let mut close = raised(now, 1);
        close.event = EventKind::Closed;
        alarms.update(&mut closed, close).unwrap();

        let config = Arc::new(crate::config::parse(CONFIG, builtin_profiles()).unwrap());
        let states: DeviceStates = Arc::new(RwLock::new(HashMap::new()));
        {
            let mut states = states.write().unwrap();
            let online = |online| DeviceState {
                online: Some(online),
                ..DeviceState::default()
            };
            states.insert(DeviceId::from("gas-01"), online(true));
            states.insert(DeviceId::from("gas-02"), online(false));
            states.insert(DeviceId::from("smoke-01"), online(true));
            // meter-01 has not reported yet.
        }
        let series =
            Arc::new(SqliteStore::open(&dir.path().join("series"), Duration::ZERO).unwrap());
        let task = SummaryTask {
            config,
            states,
            alarm_reader: Arc::new(Mutex::new(open_connection(&state_db).unwrap())),
            store: series.clone(),
            clock: Arc::new(ManualClock::new(now)),
        };

        let written = task.write_once().unwrap();
        assert_eq!(
            written,
            6 + 6 + 5,
            "six fields per site with devices, five for the empty site"
        );
        series.flush().unwrap();

        let at_now = |value: f64| vec![(now, Value::Number(value))];
        assert_eq!(stored(&series, "plant-a", "devices_total"), at_now(3.0));
        assert_eq!(stored(&series, "plant-a", "devices_online"), at_now(1.0));
        assert_eq!(
            stored(&series, "plant-a", "devices_online_ratio"),
            at_now(1.0 / 3.0)
        );
        assert_eq!(
            stored(&series, "plant-a", "alarms_active_level2"),
            at_now(1.0),
            "the two-day-old alarm counts"
        );
        assert_eq!(
            stored(&series, "plant-a", "alarms_active_level1"),
            at_now(1.0)
        );
        assert_eq!(
            stored(&series, "plant-a", "alarms_unacknowledged"),
            at_now(1.0)
        );

        assert_eq!(
            stored(&series, "park-b3", "devices_online_ratio"),
            at_now(1.0)
        );
        assert_eq!(
            stored(&series, "park-b3", "alarms_active_level2"),
            at_now(0.0),
            "a cleared alarm is not active"
        );
        assert_eq!(
            stored(&series, "park-b3", "alarms_unacknowledged"),
            at_now(1.0),
            "a cleared alarm still needs an acknowledgement"
        );

        assert_eq!(stored(&series, "empty", "devices_total"), at_now(0.0));
        assert!(stored(&series, "empty", "devices_online_ratio").is_empty());
        let keys = series.series(&Selector::default()).unwrap();
        let kinds: Vec<Option<&str>> = keys.iter().map(|k| k.tag("site_kind")).collect();
        assert!(
            kinds.iter().all(Option::is_some),
            "every point has the tag site_kind: {kinds:?}"
        );
    }
}
