//! Rule evaluation: turns each reading into the confirmed alarm level of every rule that
//! watches its metric, with deadband hysteresis and a minimum duration.
//!
//! The evaluator keeps its own state per (device, rule). Readings are evaluated in time
//! order: one older than the last evaluated reading of its rule is stored but changes no
//! alarm, so a late or replayed reading cannot clear a live alarm. The minimum duration is
//! measured with the server's clock (`now`), not the devices' timestamps, so a device clock
//! running ahead cannot shorten it.

use std::collections::HashMap;

use super::spec::{Condition, Rule};
use crate::model::{DeviceId, RuleId, Timestamp, Value};

#[derive(Clone, Debug, Default)]
struct RuleState {
    /// The level last confirmed: 0 (normal), 1 or 2.
    level: u8,
    /// A higher level seen but not yet held for the rule's minimum duration, and the
    /// server time it was first seen.
    pending: Option<(u8, Timestamp)>,
    /// Timestamp of the last reading evaluated.
    last_ts: Option<Timestamp>,
}

/// A change of a rule's confirmed level for one device.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelChange {
    pub device: DeviceId,
    pub rule: RuleId,
    pub from: u8,
    pub to: u8,
    pub value: Value,
    pub ts: Timestamp,
}

/// Rule states of every device.
#[derive(Debug, Default)]
pub struct Evaluator {
    states: HashMap<(DeviceId, RuleId), RuleState>,
}

impl Evaluator {
    /// Sets a confirmed level, as restored from open alarms after a restart.
    pub fn restore(&mut self, device: DeviceId, rule: RuleId, level: u8) {
        self.states.insert((device, rule), RuleState { level, pending: None, last_ts: None });
    }

    /// Returns the confirmed level of a rule for a device.
    pub fn level(&self, device: &DeviceId, rule: &RuleId) -> u8 {
        self.states.get(&(device.clone(), rule.clone())).map_or(0, |s| s.level)
    }

    /// Evaluates one reading against one rule at server time `now`, returning the change
    /// of confirmed level. A reading older than the last one evaluated is ignored. The
    /// change takes effect only through [`Evaluator::commit`].
    pub fn evaluate(
        &mut self,
        device: &DeviceId,
        rule: &Rule,
        value: Value,
        ts: Timestamp,
        now: Timestamp,
    ) -> Option<LevelChange> {
        let state = self.states.entry((device.clone(), rule.id.clone())).or_default();
        if state.last_ts.is_some_and(|last| ts < last) {
            return None;
        }
        state.last_ts = Some(ts);
        let observed = observed_level(rule, value, state.level);
        let from = state.level;

        let confirmed = if observed > state.level {
            if rule.min_duration.is_zero() {
                Some(observed)
            } else {
                // The pending level is the lowest level held since the wait began, so a
                // brief spike to level 2 inside a level 1 episode does not confirm level 2.
                let (pending_level, since) = match state.pending {
                    Some((level, since)) => (level.min(observed), since),
                    None => (observed, now),
                };
                state.pending = Some((pending_level, since));
                let held_ms = now.0.saturating_sub(since.0);
                let needed_ms = i64::try_from(rule.min_duration.as_millis()).unwrap_or(i64::MAX);
                (held_ms >= needed_ms).then_some(pending_level)
            }
        } else {
            state.pending = None;
            (observed < state.level).then_some(observed)
        };

        let to = confirmed?;
        if to == from {
            return None;
        }
        Some(LevelChange { device: device.clone(), rule: rule.id.clone(), from, to, value, ts })
    }

    /// Makes a change returned by [`Evaluator::evaluate`] the rule's confirmed level. A
    /// change whose `from` is no longer the confirmed level is ignored.
    pub fn commit(&mut self, change: &LevelChange) {
        let Some(state) = self.states.get_mut(&(change.device.clone(), change.rule.clone())) else { return };
        if state.level == change.from {
            state.level = change.to;
            state.pending = None;
        }
    }
}

/// Returns the level a value is at, given the level the rule was at: entering a level needs
/// the threshold, leaving it needs the value back past the threshold by the deadband.
pub fn observed_level(rule: &Rule, value: Value, current: u8) -> u8 {
    match &rule.condition {
        Condition::State { equals, level } => {
            let state = match value {
                Value::Bool(b) => b,
                Value::Number(n) => n != 0.0,
            };
            if state == *equals { *level } else { 0 }
        }
        Condition::Threshold { above, level1, level2, deadband } => {
            let v = value.as_f64();
            for (level, threshold) in [(2u8, *level2), (1u8, *level1)] {
                let Some(threshold) = threshold else { continue };
                // A level is left only when the value is beyond the threshold by more
                // than the deadband: with 25 and a deadband of 2, 23 keeps level 1.
                let (enters, stays) = if *above {
                    (v >= threshold, v >= threshold - deadband)
                } else {
                    (v <= threshold, v <= threshold + deadband)
                };
                if enters || (level <= current && stays) {
                    return level;
                }
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::MetricName;

    fn gas_rule(min_duration: Duration) -> Rule {
        Rule {
            id: RuleId::from("gas-lel"),
            metric: MetricName::from("gas_lel"),
            condition: Condition::Threshold { above: true, level1: Some(25.0), level2: Some(50.0), deadband: 2.0 },
            min_duration,
            description: String::new(),
        }
    }

    fn run(rule: &Rule, values: &[(i64, f64)]) -> Vec<(u8, u8)> {
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let mut changes = Vec::new();
        for (t, v) in values {
            if let Some(change) = evaluator.evaluate(&device, rule, Value::Number(*v), Timestamp(*t), Timestamp(*t)) {
                evaluator.commit(&change);
                changes.push((change.from, change.to));
            }
        }
        changes
    }

    #[test]
    fn raise_escalate_clear() {
        let rule = gas_rule(Duration::ZERO);
        let changes = run(&rule, &[(1, 10.0), (2, 26.0), (3, 51.0), (4, 49.0), (5, 24.0), (6, 22.9)]);
        assert_eq!(changes, vec![(0, 1), (1, 2), (2, 1), (1, 0)]);
    }

    #[test]
    fn hovering_inside_deadband_changes_once() {
        let rule = gas_rule(Duration::ZERO);
        let values: Vec<(i64, f64)> =
            (0..100).map(|i| (i, if i % 2 == 0 { 25.5 } else { 24.0 })).collect();
        assert_eq!(run(&rule, &values), vec![(0, 1)]);
    }

    #[test]
    fn below_rule_mirrors_above() {
        let rule = Rule {
            condition: Condition::Threshold { above: false, level1: Some(19.5), level2: Some(18.0), deadband: 0.5 },
            ..gas_rule(Duration::ZERO)
        };
        let changes = run(&rule, &[(1, 20.9), (2, 19.4), (3, 19.8), (4, 17.9), (5, 20.1)]);
        assert_eq!(changes, vec![(0, 1), (1, 2), (2, 0)]);
    }

    #[test]
    fn min_duration_delays_raise() {
        let rule = gas_rule(Duration::from_secs(10));
        assert_eq!(run(&rule, &[(0, 30.0), (5_000, 30.0)]), vec![]);
        assert_eq!(run(&rule, &[(0, 30.0), (5_000, 30.0), (10_000, 30.0)]), vec![(0, 1)]);
        // A dip below the threshold restarts the wait.
        assert_eq!(run(&rule, &[(0, 30.0), (5_000, 10.0), (10_000, 30.0), (15_000, 30.0)]), vec![]);
    }

    #[test]
    fn late_reading_changes_nothing() {
        let rule = gas_rule(Duration::ZERO);
        let changes = run(&rule, &[(10_000, 60.0), (5_000, 0.0), (11_000, 61.0)]);
        assert_eq!(changes, vec![(0, 2)], "the reading from before the alarm must not clear it");
    }

    #[test]
    fn deadband_edge_keeps_level() {
        let rule = gas_rule(Duration::ZERO);
        assert_eq!(run(&rule, &[(1, 26.0), (2, 23.0)]), vec![(0, 1)]);
        assert_eq!(run(&rule, &[(1, 26.0), (2, 22.99)]), vec![(0, 1), (1, 0)]);
    }

    #[test]
    fn min_duration_uses_server_time() {
        let rule = gas_rule(Duration::from_secs(10));
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let mut step = |ts: i64, now: i64| {
            let change = evaluator.evaluate(&device, &rule, Value::Number(30.0), Timestamp(ts), Timestamp(now));
            change.inspect(|c| evaluator.commit(c))
        };
        assert!(step(0, 0).is_none());
        // The device's clock jumps 200 s ahead, but only 300 ms passed at the server.
        assert!(step(200_000, 300).is_none(), "a device clock running ahead must not skip the wait");
        assert!(step(200_100, 10_000).is_some());
    }

    #[test]
    fn equals_rule_for_smoke() {
        let rule = Rule {
            id: RuleId::from("smoke"),
            metric: MetricName::from("smoke"),
            condition: Condition::State { equals: true, level: 2 },
            min_duration: Duration::ZERO,
            description: String::new(),
        };
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("smoke-01");
        let mut changes = Vec::new();
        for (t, v) in [(1, false), (2, true), (3, true), (4, false)] {
            if let Some(c) = evaluator.evaluate(&device, &rule, Value::Bool(v), Timestamp(t), Timestamp(t)) {
                evaluator.commit(&c);
                changes.push((c.from, c.to));
            }
        }
        assert_eq!(changes, vec![(0, 2), (2, 0)]);
    }

    #[test]
    fn uncommitted_change_repeats() {
        let rule = gas_rule(Duration::ZERO);
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let mut step = |ts: i64, value: f64| {
            let change = evaluator.evaluate(&device, &rule, Value::Number(value), Timestamp(ts), Timestamp(ts));
            change.map(|c| (c.from, c.to))
        };
        assert_eq!(step(1, 30.0), Some((0, 1)));
        assert_eq!(step(2, 31.0), Some((0, 1)), "a raise that was not committed must be returned again");
        assert_eq!(step(3, 10.0), None, "without a committed raise there is nothing to clear");
    }

    #[test]
    fn uncommitted_raise_keeps_min_duration_wait() {
        let rule = gas_rule(Duration::from_secs(10));
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let value = Value::Number(30.0);
        assert!(evaluator.evaluate(&device, &rule, value, Timestamp(0), Timestamp(0)).is_none());
        let first = evaluator.evaluate(&device, &rule, value, Timestamp(10_000), Timestamp(10_000));
        assert_eq!(first.as_ref().map(|c| c.to), Some(1));
        // The store failed, so the raise was not committed: the next reading raises at once
        // instead of waiting another `min_duration`.
        let again = evaluator.evaluate(&device, &rule, value, Timestamp(10_500), Timestamp(10_500));
        assert_eq!(again.as_ref().map(|c| c.to), Some(1));
        evaluator.commit(&again.unwrap());
        assert_eq!(evaluator.level(&device, &rule.id), 1);
        assert!(evaluator.evaluate(&device, &rule, value, Timestamp(11_000), Timestamp(11_000)).is_none());
    }
}
