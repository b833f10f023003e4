//! The alarm stage: one task that owns every open alarm and applies rule level changes,
//! liveness changes and operator actions in the order they arrive.
//!
//! At most one alarm is open (not closed) per device and rule. A level rise on an active
//! alarm escalates it; a level drop to 0 clears it; a new rise on a cleared alarm raises
//! the same alarm again, which then needs a new acknowledgement. An alarm keeps the
//! highest level it reached until it clears.
//!
//! Memory follows the store: a rule's level, an open alarm and the liveness the stage acts
//! on change only after the transition is committed to the state database. When a write
//! fails, nothing changes in memory, so the next reading of the rule (or the retry of a
//! liveness change, or of the operator action) performs the same transition again.

mod admin;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};

use super::store::AlarmStore;
use super::{Alarm, AlarmId, AlarmKind, AlarmState, EventKind, OFFLINE_RULE, Signoff, Transition};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::SharedRegistry;
use crate::model::{DeviceId, MetricName, Reading, RuleId, SiteId, Source, Timestamp, Value};
use crate::notify::DispatcherHandle;
use crate::rules::engine::{Evaluator, LevelChange, order_key};
use crate::rules::spec::Rule;
use crate::storage::{Point, SeriesKey, TimeSeriesStore};
pub use admin::{ResetRequest, WebhookUpdate};

/// Measurement that alarm transitions are written to, for dashboards and annotations.
pub const ALARM_EVENTS_MEASUREMENT: &str = "alarm_events";

/// Measurement with each alarm's current level after every transition: the level while
/// active, 0 once cleared or closed. `last(level)` per series shows what is active now.
pub const ALARM_STATE_MEASUREMENT: &str = "alarm_state";

/// How often a liveness change whose transition could not be stored is tried again while
/// no command arrives. Every command also tries it first.
const LIVENESS_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Maximum wait between two checks of a pending level that is not due yet. The due time is
/// server clock time, so the stage checks again at least this often in case the clock
/// moved differently from the runtime's timer, as a test's manual clock does.
const PENDING_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// How often a failing store is logged at ERROR; failures in between are counted.
const STORE_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Reason an operator action was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("alarm {0} not found")]
    NotFound(AlarmId),
    #[error("{0}")]
    Conflict(String),
    #[error("storing the alarm failed: {0}")]
    Storage(String),
    #[error("the alarm stage is shut down")]
    Closed,
}

/// A message to the alarm task.
pub enum AlarmCommand {
    /// Readings with the server time at which they were received, which bounds their
    /// ordering key (see [`crate::rules::engine::order_key`]).
    Readings {
        readings: Vec<Reading>,
        received: Timestamp,
    },
    Liveness {
        device: DeviceId,
        online: bool,
        at: Timestamp,
        cause: String,
    },
    Acknowledge {
        id: AlarmId,
        by: String,
        note: Option<String>,
        reply: oneshot::Sender<Result<Alarm, ActionError>>,
    },
    /// Closes a cleared alarm. The note is required, as on a work order.
    Close {
        id: AlarmId,
        by: String,
        note: String,
        reply: oneshot::Sender<Result<Alarm, ActionError>>,
    },
    Reset {
        request: ResetRequest,
        reply: oneshot::Sender<Result<Alarm, ActionError>>,
    },
    Reload {
        config: Arc<Config>,
        webhooks: Option<WebhookUpdate>,
        reply: oneshot::Sender<()>,
    },
}

/// A cloneable handle to the alarm task.
#[derive(Clone)]
pub struct AlarmHandle {
    tx: mpsc::Sender<AlarmCommand>,
}

impl AlarmHandle {
    pub async fn send(&self, command: AlarmCommand) -> Result<(), ActionError> {
        self.tx.send(command).await.map_err(|_| ActionError::Closed)
    }

    pub async fn acknowledge(
        &self,
        id: AlarmId,
        by: String,
        note: Option<String>,
    ) -> Result<Alarm, ActionError> {
        let (reply, wait) = oneshot::channel();
        self.send(AlarmCommand::Acknowledge {
            id,
            by,
            note,
            reply,
        })
        .await?;
        wait.await.map_err(|_| ActionError::Closed)?
    }

    pub async fn close(&self, id: AlarmId, by: String, note: String) -> Result<Alarm, ActionError> {
        let (reply, wait) = oneshot::channel();
        self.send(AlarmCommand::Close {
            id,
            by,
            note,
            reply,
        })
        .await?;
        wait.await.map_err(|_| ActionError::Closed)?
    }
}

struct DeviceRules {
    site: SiteId,
    rules: Vec<Rule>,
    units: HashMap<MetricName, Option<String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLevel {
    state: String,
    level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

struct AlarmMetrics {
    open: Family<StateLevel, Gauge>,
    transitions: Family<EventLabel, Counter>,
    store_failures: Counter,
}

/// A liveness change whose transition could not be stored yet.
struct PendingLiveness {
    online: bool,
    at: Timestamp,
    cause: String,
}

/// Rate limit of the ERROR log for store failures.
#[derive(Default)]
struct FailureLog {
    /// When the last failure was logged, `None` while the store works.
    last_logged: Option<Instant>,
    /// Failures since the last log line.
    suppressed: u64,
    /// Failures since the store last worked.
    since_working: u64,
}

/// The alarm stage's state; see the module docs.
pub struct AlarmManager {
    store: AlarmStore,
    evaluator: Evaluator,
    open: HashMap<(DeviceId, RuleId), Alarm>,
    devices: HashMap<DeviceId, DeviceRules>,
    offline_level: u8,
    clock: SharedClock,
    dispatcher: DispatcherHandle,
    series: Option<Arc<dyn TimeSeriesStore>>,
    metrics: AlarmMetrics,
    /// Liveness changes to store on the next command or retry, by device.
    // NOTE: kept in memory only, so a restart drops them. After a restart the pipeline
    // learns liveness again: a silent device goes offline after its staleness timeout, and
    // a reading from a device brings it online.
    pending_liveness: HashMap<DeviceId, PendingLiveness>,
    failure_log: FailureLog,
}

impl AlarmManager {
    /// Builds the stage from the config and restores open alarms from the store.
    pub fn new(
        config: &Config,
        store: AlarmStore,
        clock: SharedClock,
        dispatcher: DispatcherHandle,
        series: Option<Arc<dyn TimeSeriesStore>>,
        registry: &SharedRegistry,
    ) -> rusqlite::Result<AlarmManager> {
        let devices = admin::device_rules(config);
        let metrics = AlarmMetrics {
            open: Family::default(),
            transitions: Family::default(),
            store_failures: Counter::default(),
        };
        registry.register(|r| {
            r.register(
                "alarms",
                "Alarms that are not closed, by state and level",
                metrics.open.clone(),
            );
            r.register(
                "alarm_transitions",
                "Alarm transitions, by event",
                metrics.transitions.clone(),
            );
            r.register(
                "alarm_store_failures",
                "Alarm transitions that could not be stored",
                metrics.store_failures.clone(),
            );
        });

        let mut evaluator = Evaluator::default();
        let mut open = HashMap::new();
        for alarm in store.open_alarms()? {
            if alarm.state == AlarmState::Active && alarm.kind == AlarmKind::Rule {
                evaluator.restore(alarm.device.clone(), alarm.rule.clone(), alarm.level);
            }
            if alarm.kind == AlarmKind::Rule {
                // A reading older than the alarm's last rule transition changes nothing,
                // also after a restart. Operator actions carry server time, not reading
                // time, so they do not count.
                let last_rule_transition = alarm
                    .history
                    .iter()
                    .filter(|t| {
                        matches!(
                            t.event,
                            EventKind::Raised | EventKind::Escalated | EventKind::Cleared
                        )
                    })
                    .map(|t| t.at)
                    .max()
                    .unwrap_or(alarm.raised_at);
                evaluator.restore_order(
                    alarm.device.clone(),
                    alarm.rule.clone(),
                    last_rule_transition,
                );
            }
            open.insert((alarm.device.clone(), alarm.rule.clone()), alarm);
        }
        if !open.is_empty() {
            tracing::info!(open_alarms = open.len(), "restored open alarms");
        }
        let manager = AlarmManager {
            store,
            evaluator,
            open,
            devices,
            offline_level: config.alarms.offline_level,
            clock,
            dispatcher,
            series,
            metrics,
            pending_liveness: HashMap::new(),
            failure_log: FailureLog::default(),
        };
        manager.update_gauges();
        Ok(manager)
    }

    /// Starts the task; it ends when every handle is dropped. Must be called within a
    /// Tokio runtime.
    pub fn spawn(mut self, capacity: usize) -> (AlarmHandle, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel(capacity);
        let runtime = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            loop {
                let wait = self.next_wait();
                let received = runtime.block_on(tokio::time::timeout(wait, rx.recv()));
                match received {
                    Ok(Some(command)) => self.handle(command),
                    Ok(None) => break,
                    Err(_elapsed) => {
                        self.retry_liveness();
                        self.confirm_pending();
                    }
                }
            }
        });
        (AlarmHandle { tx }, task)
    }

    /// Returns how long the task waits for a command before it retries liveness changes
    /// and checks pending levels: until the next pending level is due, at most
    /// [`PENDING_CHECK_INTERVAL`] while one waits, else [`LIVENESS_RETRY_INTERVAL`].
    fn next_wait(&self) -> Duration {
        let Some(due) = self.evaluator.next_due() else {
            return LIVENESS_RETRY_INTERVAL;
        };
        let remaining = due.0.saturating_sub(self.clock.now().0);
        if remaining <= 0 {
            // Due but not confirmed, because storing the raise failed: try again with the
            // liveness retries instead of in a tight loop.
            return LIVENESS_RETRY_INTERVAL;
        }
        Duration::from_millis(u64::try_from(remaining).unwrap_or(u64::MAX))
            .min(PENDING_CHECK_INTERVAL)
    }

    /// Applies one command, after retrying liveness changes that could not be stored and
    /// confirming pending levels that are due.
    pub fn handle(&mut self, command: AlarmCommand) {
        self.retry_liveness();
        self.confirm_pending();
        match command {
            AlarmCommand::Readings { readings, received } => {
                for reading in readings {
                    self.evaluate(&reading, received);
                }
            }
            AlarmCommand::Liveness {
                device,
                online,
                at,
                cause,
            } => {
                // A newer change replaces one that is still waiting to be stored.
                self.pending_liveness.remove(&device);
                self.apply_liveness(device, PendingLiveness { online, at, cause });
            }
            AlarmCommand::Acknowledge {
                id,
                by,
                note,
                reply,
            } => {
                let _ = reply.send(self.acknowledge(id, by, note));
            }
            AlarmCommand::Close {
                id,
                by,
                note,
                reply,
            } => {
                let _ = reply.send(self.close(id, by, note));
            }
            AlarmCommand::Reset { request, reply } => {
                let _ = reply.send(self.reset(request));
            }
            AlarmCommand::Reload {
                config,
                webhooks,
                reply,
            } => {
                self.reload(&config, webhooks);
                let _ = reply.send(());
            }
        }
    }

    fn evaluate(&mut self, reading: &Reading, received: Timestamp) {
        let Some(device) = self.devices.get(&reading.device) else {
            return;
        };
        // A condition starts when the server received the reading, not when this task got
        // to it, so a busy task neither delays nor shortens `min_duration`.
        let now = received;
        let key = order_key(reading.ts, received);
        let changes: Vec<(LevelChange, Rule)> = device
            .rules
            .iter()
            .filter(|r| r.metric == reading.metric)
            .filter_map(|rule| {
                self.evaluator
                    .evaluate(&reading.device, rule, reading.value, reading.ts, key, now)
                    .map(|change| (change, rule.clone()))
            })
            .collect();
        for (change, rule) in changes {
            if self.apply_level(&change, &rule, reading) {
                self.evaluator.commit(&change);
            }
        }
    }

    /// Confirms every pending level whose minimum duration has passed without a reading
    /// that contradicted it, so a device that reports only on change still raises.
    fn confirm_pending(&mut self) {
        let now = self.clock.now();
        for (device, rule_id) in self.evaluator.due(now) {
            let Some(entry) = self.devices.get(&device) else {
                self.evaluator.drop_pending(&device, &rule_id);
                continue;
            };
            let Some(rule) = entry.rules.iter().find(|r| r.id == rule_id).cloned() else {
                self.evaluator.drop_pending(&device, &rule_id);
                continue;
            };
            let Some(change) = self.evaluator.confirm_due(&device, &rule, now) else {
                continue;
            };
            // The reading that kept the level pending, rebuilt for the alarm's fields. Its
            // source is not stored with the alarm.
            let reading = Reading {
                site: entry.site.clone(),
                device: device.clone(),
                metric: rule.metric.clone(),
                ts: change.ts,
                value: change.value,
                source: Source::Mqtt,
            };
            if self.apply_level(&change, &rule, &reading) {
                self.evaluator.commit(&change);
            }
        }
    }

    /// Raises the ordering floor of each rule to the ordering key of the device's latest
    /// stored reading of the rule's metric, as restored at start. Open alarms already set
    /// the floor to their last transition when the stage was built.
    pub fn restore_latest(&mut self, states: &HashMap<DeviceId, crate::pipeline::DeviceState>) {
        for (device, entry) in &self.devices {
            let Some(state) = states.get(device) else {
                continue;
            };
            for rule in &entry.rules {
                if let Some(key) = state.latest_order.get(&rule.metric) {
                    self.evaluator
                        .restore_order(device.clone(), rule.id.clone(), *key);
                }
            }
        }
    }

    /// Stores the alarm transition that a level change causes, if any. Returns `false` when
    /// storing failed, so the rule must keep its old level.
    fn apply_level(&mut self, change: &LevelChange, rule: &Rule, reading: &Reading) -> bool {
        let key = (change.device.clone(), change.rule.clone());
        let actor = format!("rule:{}", rule.id);
        let value = Some(change.value.as_f64());
        let existing = self.open.get(&key).map(|a| a.state);
        match (existing, change.to) {
            (None, level) if level > 0 => {
                let alarm = self.new_alarm(rule, reading, level);
                let transition = transition(EventKind::Raised, change.ts, &actor, level, value);
                self.insert(alarm, transition).is_ok()
            }
            (Some(AlarmState::Cleared), level) if level > 0 => {
                let t = transition(EventKind::Raised, change.ts, &actor, level, value);
                self.modify(&key, t, |alarm| {
                    alarm.state = AlarmState::Active;
                    alarm.level = level;
                    alarm.acknowledged = None;
                    alarm.cleared_at = None;
                    alarm.raised_at = change.ts;
                    alarm.value = value;
                    alarm.threshold = rule.threshold(level);
                })
                .is_ok()
            }
            (Some(AlarmState::Active), 0) => {
                let level = self.open.get(&key).map_or(1, |a| a.level);
                let t = transition(EventKind::Cleared, change.ts, &actor, level, value);
                self.modify(&key, t, |alarm| {
                    alarm.state = AlarmState::Cleared;
                    alarm.cleared_at = Some(change.ts);
                    alarm.value = value;
                })
                .is_ok()
            }
            (Some(AlarmState::Active), level)
                if level > self.open.get(&key).map_or(0, |a| a.level) =>
            {
                let t = transition(EventKind::Escalated, change.ts, &actor, level, value);
                self.modify(&key, t, |alarm| {
                    alarm.level = level;
                    alarm.value = value;
                    alarm.threshold = rule.threshold(level);
                })
                .is_ok()
            }
            // No transition: a drop between the levels, which the alarm keeps at its highest.
            _ => true,
        }
    }

    fn new_alarm(&self, rule: &Rule, reading: &Reading, level: u8) -> Alarm {
        let unit = self
            .devices
            .get(&reading.device)
            .and_then(|d| d.units.get(&reading.metric).cloned().flatten());
        Alarm {
            id: AlarmId(0),
            rule: rule.id.clone(),
            kind: AlarmKind::Rule,
            site: reading.site.clone(),
            device: reading.device.clone(),
            metric: Some(reading.metric.clone()),
            unit,
            level,
            state: AlarmState::Active,
            acknowledged: None,
            closed: None,
            value: Some(reading.value.as_f64()),
            threshold: rule.threshold(level),
            raised_at: reading.ts,
            updated_at: reading.ts,
            cleared_at: None,
            description: rule.description.clone(),
            history: Vec::new(),
        }
    }

    /// Tries the liveness changes whose transitions could not be stored before, oldest
    /// first.
    fn retry_liveness(&mut self) {
        if self.pending_liveness.is_empty() {
            return;
        }
        let mut waiting: Vec<(Timestamp, DeviceId)> = self
            .pending_liveness
            .iter()
            .map(|(device, change)| (change.at, device.clone()))
            .collect();
        waiting.sort();
        for (_, device) in waiting {
            let Some(change) = self.pending_liveness.remove(&device) else {
                continue;
            };
            if !self.apply_liveness(device, change) {
                // The store still fails: the others wait for the next retry instead of each
                // waiting for the same failure now.
                break;
            }
        }
    }

    /// Applies a liveness change, keeping it for a retry when its transition could not be
    /// stored.
    fn apply_liveness(&mut self, device: DeviceId, change: PendingLiveness) -> bool {
        let stored = self.liveness(&device, change.online, change.at, &change.cause);
        if !stored {
            self.pending_liveness.insert(device, change);
        }
        stored
    }

    /// Stores the transition of a liveness change, if any. Returns `false` when storing
    /// failed.
    fn liveness(&mut self, device: &DeviceId, online: bool, at: Timestamp, cause: &str) -> bool {
        let Some(site) = self.devices.get(device).map(|d| d.site.clone()) else {
            return true;
        };
        let key = (device.clone(), RuleId::from(OFFLINE_RULE));
        let note = Some(cause.to_owned());
        let state = self.open.get(&key).map(|a| a.state);
        let level = self.offline_level;
        match (online, state) {
            (false, None) => {
                let alarm = Alarm {
                    id: AlarmId(0),
                    rule: key.1.clone(),
                    kind: AlarmKind::Offline,
                    site,
                    device: device.clone(),
                    metric: None,
                    unit: None,
                    level,
                    state: AlarmState::Active,
                    acknowledged: None,
                    closed: None,
                    value: None,
                    threshold: None,
                    raised_at: at,
                    updated_at: at,
                    cleared_at: None,
                    description: "device offline".to_owned(),
                    history: Vec::new(),
                };
                let mut t = transition(EventKind::DeviceOffline, at, "system", level, None);
                t.note = note;
                self.insert(alarm, t).is_ok()
            }
            (false, Some(AlarmState::Cleared)) => {
                let mut t = transition(EventKind::DeviceOffline, at, "system", level, None);
                t.note = note;
                self.modify(&key, t, |alarm| {
                    alarm.state = AlarmState::Active;
                    alarm.acknowledged = None;
                    alarm.cleared_at = None;
                    alarm.raised_at = at;
                })
                .is_ok()
            }
            (true, Some(AlarmState::Active)) => {
                let mut t = transition(EventKind::DeviceOnline, at, "system", level, None);
                t.note = note;
                self.modify(&key, t, |alarm| {
                    alarm.state = AlarmState::Cleared;
                    alarm.cleared_at = Some(at);
                })
                .is_ok()
            }
            _ => true,
        }
    }

    fn find_open(&self, id: AlarmId) -> Option<(DeviceId, RuleId)> {
        self.open
            .iter()
            .find(|(_, a)| a.id == id)
            .map(|(k, _)| k.clone())
    }

    fn not_open_error(&self, id: AlarmId) -> ActionError {
        match self.store.get(id) {
            Ok(Some(_)) => ActionError::Conflict(format!("alarm {id} is already closed")),
            Ok(None) => ActionError::NotFound(id),
            Err(e) => ActionError::Storage(e.to_string()),
        }
    }

    fn acknowledge(
        &mut self,
        id: AlarmId,
        by: String,
        note: Option<String>,
    ) -> Result<Alarm, ActionError> {
        let key = self.find_open(id).ok_or_else(|| self.not_open_error(id))?;
        let alarm = &self.open[&key];
        if let Some(ack) = &alarm.acknowledged {
            return Err(ActionError::Conflict(format!(
                "alarm {id} was already acknowledged by {} at {}",
                ack.by, ack.at
            )));
        }
        let now = self.clock.now();
        let mut t = transition(EventKind::Acknowledged, now, &by, alarm.level, alarm.value);
        t.note.clone_from(&note);
        self.modify(&key, t, |alarm| {
            alarm.acknowledged = Some(Signoff { by, at: now, note });
        })
    }

    /// Closes a cleared alarm. The close is recorded in `closed` and in its own transition;
    /// `acknowledged` stays as it was, `None` when nobody acknowledged the alarm.
    fn close(&mut self, id: AlarmId, by: String, note: String) -> Result<Alarm, ActionError> {
        let key = self.find_open(id).ok_or_else(|| self.not_open_error(id))?;
        let alarm = &self.open[&key];
        if alarm.state == AlarmState::Active {
            return Err(ActionError::Conflict(format!(
                "alarm {id} is still active; it can be closed once its condition clears"
            )));
        }
        let now = self.clock.now();
        let mut t = transition(EventKind::Closed, now, &by, alarm.level, alarm.value);
        t.note = Some(note.clone());
        self.modify(&key, t, |alarm| {
            alarm.state = AlarmState::Closed;
            alarm.closed = Some(Signoff {
                by,
                at: now,
                note: Some(note),
            });
        })
    }

    /// Stores a new alarm with its first transition and then adds it to the open alarms.
    fn insert(&mut self, alarm: Alarm, transition: Transition) -> Result<Alarm, rusqlite::Error> {
        let level = transition.level;
        let event = transition.event;
        let (device, rule) = (alarm.device.clone(), alarm.rule.clone());
        match self.store.insert(alarm, transition) {
            Ok((alarm, event)) => {
                self.store_worked();
                self.after_transition(&alarm, event.kind, level);
                self.open
                    .insert((alarm.device.clone(), alarm.rule.clone()), alarm.clone());
                self.update_gauges();
                Ok(alarm)
            }
            Err(e) => {
                self.store_failed(&e, None, &device, &rule, event);
                Err(e)
            }
        }
    }

    /// Stores a changed copy of an open alarm with the transition, then replaces the open
    /// alarm with it, or drops it from the open alarms once it is closed. On a store
    /// failure the open alarm stays as it was.
    fn modify(
        &mut self,
        key: &(DeviceId, RuleId),
        transition: Transition,
        change: impl FnOnce(&mut Alarm),
    ) -> Result<Alarm, ActionError> {
        let Some(open) = self.open.get(key) else {
            return Err(ActionError::Conflict(format!(
                "no open alarm for device {} and rule {}",
                key.0, key.1
            )));
        };
        let mut alarm = open.clone();
        change(&mut alarm);
        alarm.updated_at = transition.at;
        let level = transition.level;
        let event = transition.event;
        match self.store.update(&mut alarm, transition) {
            Ok(event) => {
                self.store_worked();
                self.after_transition(&alarm, event.kind, level);
                if alarm.state == AlarmState::Closed {
                    self.open.remove(key);
                } else {
                    self.open.insert(key.clone(), alarm.clone());
                }
                self.update_gauges();
                Ok(alarm)
            }
            Err(e) => {
                self.store_failed(&e, Some(alarm.id), &key.0, &key.1, event);
                Err(ActionError::Storage(e.to_string()))
            }
        }
    }

    /// Counts a failed transition and logs it at ERROR, at most once per
    /// [`STORE_FAILURE_LOG_INTERVAL`] with the number of failures in between.
    fn store_failed(
        &mut self,
        error: &rusqlite::Error,
        alarm: Option<AlarmId>,
        device: &DeviceId,
        rule: &RuleId,
        event: EventKind,
    ) {
        self.metrics.store_failures.inc();
        let log = &mut self.failure_log;
        log.since_working += 1;
        let now = Instant::now();
        if log
            .last_logged
            .is_some_and(|last| now.duration_since(last) < STORE_FAILURE_LOG_INTERVAL)
        {
            log.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last_logged = Some(now);
        tracing::error!(
            error = %error,
            alarm = alarm.map(|id| id.0),
            device = %device,
            rule = %rule,
            event = event.as_str(),
            failed_since_last_log = suppressed,
            "storing an alarm transition failed, so the alarm is unchanged; the next reading or a retry \
             performs it again. Check the data directory's disk and permissions"
        );
    }

    /// Logs the first stored transition after store failures.
    fn store_worked(&mut self) {
        let log = std::mem::take(&mut self.failure_log);
        if log.since_working > 0 {
            tracing::info!(
                failed_transitions = log.since_working,
                "storing alarm transitions works again"
            );
        }
    }

    fn after_transition(&self, alarm: &Alarm, kind: EventKind, level: u8) {
        self.dispatcher.wake();
        self.metrics
            .transitions
            .get_or_create(&EventLabel {
                event: kind.as_str().to_owned(),
            })
            .inc();
        tracing::info!(
            alarm = alarm.id.0,
            event = kind.as_str(),
            site = %alarm.site,
            device = %alarm.device,
            rule = %alarm.rule,
            level,
            value = alarm.value,
            "alarm {}", kind.as_str()
        );
        if let Some(series) = &self.series {
            let at = alarm.history.last().map_or(alarm.updated_at, |t| t.at);
            let tags = vec![
                ("site".to_owned(), alarm.site.to_string()),
                ("device".to_owned(), alarm.device.to_string()),
                ("rule".to_owned(), alarm.rule.to_string()),
                ("event".to_owned(), kind.as_str().to_owned()),
            ];
            let mut points = vec![Point {
                series: SeriesKey::new(ALARM_EVENTS_MEASUREMENT, tags.clone(), "level"),
                ts: at,
                value: Value::Number(f64::from(level)),
            }];
            if let Some(value) = alarm.value {
                points.push(Point {
                    series: SeriesKey::new(ALARM_EVENTS_MEASUREMENT, tags.clone(), "value"),
                    ts: at,
                    value: Value::Number(value),
                });
            }
            let active_level = if alarm.state == AlarmState::Active {
                alarm.level
            } else {
                0
            };
            points.push(Point {
                series: SeriesKey::new(ALARM_STATE_MEASUREMENT, tags[..3].to_vec(), "level"),
                ts: at,
                value: Value::Number(f64::from(active_level)),
            });
            if let Err(e) = series.write(points) {
                tracing::warn!(error = %e, "writing the alarm event to the time series failed");
            }
        }
    }

    fn update_gauges(&self) {
        self.metrics.open.clear();
        for state in [AlarmState::Active, AlarmState::Cleared] {
            for level in [1u8, 2] {
                let count = self
                    .open
                    .values()
                    .filter(|a| a.state == state && a.level == level)
                    .count();
                self.metrics
                    .open
                    .get_or_create(&StateLevel {
                        state: state.as_str().to_owned(),
                        level: level.to_string(),
                    })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }
}

fn transition(
    event: EventKind,
    at: Timestamp,
    actor: &str,
    level: u8,
    value: Option<f64>,
) -> Transition {
    Transition {
        event,
        at,
        actor: actor.to_owned(),
        level,
        value,
        note: None,
    }
}
