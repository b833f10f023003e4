//! Commands of the alarm stage that change its setup or override a rule: config reload and
//! the manual reset of an active alarm.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{ActionError, AlarmCommand, AlarmHandle, AlarmManager, DeviceRules, transition};
use crate::alarms::{Alarm, AlarmId, AlarmKind, AlarmState, EventKind};
use crate::config::Config;
use crate::model::{DeviceId, Value};
use crate::notify::{DispatcherHandle, Webhook};
use crate::pipeline::DeviceStates;
use crate::rules::engine::observed_level;

/// New webhooks for the alarm stage, with the handle of the dispatcher that serves them.
pub struct WebhookUpdate {
    pub webhooks: Vec<Webhook>,
    pub dispatcher: DispatcherHandle,
}

/// A manual reset request, as [`AlarmCommand::Reset`] carries it.
pub struct ResetRequest {
    pub id: AlarmId,
    pub by: String,
    pub note: Option<String>,
    /// Liveness and latest values of the devices, read when the command is applied.
    pub states: DeviceStates,
}

impl AlarmHandle {
    /// Applies a new config's rules, offline level and, when given, webhooks. Returns once
    /// the alarm stage uses them.
    pub async fn reload(
        &self,
        config: Arc<Config>,
        webhooks: Option<WebhookUpdate>,
    ) -> Result<(), ActionError> {
        let (reply, wait) = oneshot::channel();
        self.send(AlarmCommand::Reload {
            config,
            webhooks,
            reply,
        })
        .await?;
        wait.await.map_err(|_| ActionError::Closed)
    }

    /// Returns an active alarm to cleared by hand; see [`AlarmManager::reset`].
    pub async fn reset(&self, request: ResetRequest) -> Result<Alarm, ActionError> {
        let (reply, wait) = oneshot::channel();
        self.send(AlarmCommand::Reset { request, reply }).await?;
        wait.await.map_err(|_| ActionError::Closed)?
    }
}

/// Builds the rules and metric units of every configured device.
pub(super) fn device_rules(config: &Config) -> HashMap<DeviceId, DeviceRules> {
    let mut devices = HashMap::new();
    for device in &config.devices {
        let units = config
            .profiles
            .get(&device.profile)
            .map(|p| {
                p.metrics
                    .iter()
                    .map(|m| (m.name.clone(), m.unit.clone()))
                    .collect()
            })
            .unwrap_or_default();
        devices.insert(
            device.id.clone(),
            DeviceRules {
                site: device.site.clone(),
                rules: device.rules.clone(),
                units,
            },
        );
    }
    devices
}

impl AlarmManager {
    /// Replaces the rules of every device. Open alarms stay as they are: an alarm of a
    /// removed device or rule keeps its state until an operator resets or closes it, and a
    /// changed rule acts on the next reading with the confirmed level it had.
    pub(super) fn reload(&mut self, config: &Config, webhooks: Option<WebhookUpdate>) {
        self.devices = device_rules(config);
        self.offline_level = config.alarms.offline_level;
        if let Some(update) = webhooks {
            self.store.set_webhooks(update.webhooks);
            self.dispatcher = update.dispatcher;
            // Wakes the new workers for rows queued while the old dispatcher stopped.
            self.dispatcher.wake();
        }
        tracing::info!(
            devices = self.devices.len(),
            open_alarms = self.open.len(),
            "alarm rules reloaded"
        );
    }

    /// Returns an active alarm to cleared with a `reset` transition, when its condition can
    /// no longer be shown to hold: the device's latest value is back past the threshold by
    /// the deadband, the device is offline, or its device or rule was removed from the
    /// config. Otherwise returns a conflict that names the current value and threshold.
    pub(super) fn reset(&mut self, request: ResetRequest) -> Result<Alarm, ActionError> {
        let ResetRequest {
            id,
            by,
            note,
            states,
        } = request;
        let key = self.find_open(id).ok_or_else(|| self.not_open_error(id))?;
        let alarm = &self.open[&key];
        if alarm.state != AlarmState::Active {
            return Err(ActionError::Conflict(format!(
                "alarm {id} is {}, not active; close it with POST /api/v1/alarms/{id}/close",
                alarm.state.as_str()
            )));
        }
        let value = {
            let states = states
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.reset_evidence(alarm, states.get(&alarm.device))?
        };
        let now = self.clock.now();
        let mut t = transition(
            EventKind::Reset,
            now,
            &by,
            alarm.level,
            value.or(alarm.value),
        );
        t.note = note;
        let reset = self.modify(&key, t, |alarm| {
            alarm.state = AlarmState::Cleared;
            alarm.cleared_at = Some(now);
            if value.is_some() {
                alarm.value = value;
            }
        })?;
        if key.1.as_str() != crate::alarms::OFFLINE_RULE {
            // The rule starts again from normal, so the next reading that meets it raises
            // the alarm again.
            self.evaluator.restore(key.0.clone(), key.1.clone(), 0);
        }
        Ok(reset)
    }

    /// Checks that a reset is allowed, returning the latest value that shows it.
    fn reset_evidence(
        &self,
        alarm: &Alarm,
        state: Option<&crate::pipeline::DeviceState>,
    ) -> Result<Option<f64>, ActionError> {
        let id = alarm.id;
        let online = state.and_then(|s| s.online);
        let Some(device) = self.devices.get(&alarm.device) else {
            // The device was removed from the config, so nothing can clear the alarm.
            return Ok(None);
        };
        if alarm.kind == AlarmKind::Offline {
            return match online {
                Some(true) => Ok(None),
                _ => Err(ActionError::Conflict(format!(
                    "alarm {id}: device `{}` is still offline; the alarm clears when the device reports again",
                    alarm.device
                ))),
            };
        }
        let Some(rule) = device.rules.iter().find(|r| r.id == alarm.rule) else {
            // The rule was removed from the config, so nothing can clear the alarm.
            return Ok(None);
        };
        if online == Some(false) {
            return Ok(None);
        }
        if state.is_some_and(|s| s.restored.contains(&rule.metric)) {
            return Err(ActionError::Conflict(format!(
                "alarm {id}: no reading of `{}` from device `{}` was received since the server \
                 started, and the stored latest value may not be the last one the device sent; \
                 wait for a reading or for the device to go stale",
                rule.metric, alarm.device
            )));
        }
        let latest = state.and_then(|s| s.latest.get(&rule.metric)).copied();
        let Some((ts, latest)) = latest else {
            return Err(ActionError::Conflict(format!(
                "alarm {id}: no reading of `{}` from device `{}` is stored or received, so the \
                 rule cannot be checked; wait for a reading or for the device to go stale",
                rule.metric, alarm.device
            )));
        };
        if observed_level(rule, latest, alarm.level) == 0 {
            return Ok(Some(latest.as_f64()));
        }
        Err(ActionError::Conflict(format!(
            "alarm {id}: the latest value of `{}` is {} at {}, which still meets the rule \
             (threshold {}, deadband {}); the alarm clears by itself once the value is back",
            rule.metric,
            describe_value(latest),
            ts,
            rule.threshold(alarm.level)
                .map_or_else(|| "-".to_owned(), |t| t.to_string()),
            rule_deadband(rule),
        )))
    }
}

fn describe_value(value: Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
    }
}

fn rule_deadband(rule: &crate::rules::spec::Rule) -> f64 {
    match rule.condition {
        crate::rules::spec::Condition::Threshold { deadband, .. } => deadband,
        crate::rules::spec::Condition::State { .. } => 0.0,
    }
}
