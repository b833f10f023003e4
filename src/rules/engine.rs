//! Rule evaluation: turns each reading into the confirmed alarm level of every rule that
//! watches its metric, with deadband hysteresis and a minimum duration.
//!
//! The evaluator keeps its own state per (device, rule). Readings are evaluated in the
//! order of their ordering key, [`order_key`]: the reading's timestamp, but never later
//! than the server time the reading was received. A reading whose key is older than the
//! last evaluated one of its rule is stored but changes no alarm, so a late or replayed
//! reading cannot clear a live alarm. Because of the cap, a reading dated in the future
//! cannot hold back the readings after it. The minimum duration is measured with the server's clock
//! (`now`), not the devices' timestamps, so a device clock running ahead cannot shorten
//! it. A pending level is confirmed by the next reading or, without one, by
//! [`Evaluator::confirm_due`] once the minimum duration has passed.

use std::collections::HashMap;

use super::spec::{Condition, Rule};
use crate::model::{DeviceId, RuleId, Timestamp, Value};

/// Returns the key that orders a reading for rules and for a device's latest values: its
/// timestamp `ts`, but at most the server time `received` at which it arrived.
pub fn order_key(ts: Timestamp, received: Timestamp) -> Timestamp {
    ts.min(received)
}

/// A higher level seen but not yet held for the rule's minimum duration.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// The lowest level held since the wait began.
    level: u8,
    /// Server time at which the wait began.
    since: Timestamp,
    /// Server time at which the level is confirmed if no reading contradicts it.
    due: Timestamp,
    /// Value and timestamp of the last reading that kept the level pending.
    value: Value,
    ts: Timestamp,
}

#[derive(Clone, Debug, Default)]
struct RuleState {
    /// The level last confirmed: 0 (normal), 1 or 2.
    level: u8,
    pending: Option<Pending>,
    /// Ordering key of the last reading evaluated, or the floor set by a restore.
    last_key: Option<Timestamp>,
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
    /// Sets a confirmed level, as restored from open alarms after a restart or set by a
    /// manual reset. A pending level is dropped and the ordering floor kept.
    pub fn restore(&mut self, device: DeviceId, rule: RuleId, level: u8) {
        let state = self.states.entry((device, rule)).or_default();
        state.level = level;
        state.pending = None;
    }

    /// Raises the ordering floor of a rule: readings with an older ordering key change
    /// nothing. Set at start from the latest stored reading and from the last transition
    /// of an open alarm, so the floor survives a restart.
    pub fn restore_order(&mut self, device: DeviceId, rule: RuleId, key: Timestamp) {
        let state = self.states.entry((device, rule)).or_default();
        state.last_key = Some(state.last_key.map_or(key, |last| last.max(key)));
    }

    /// Returns the confirmed level of a rule for a device.
    pub fn level(&self, device: &DeviceId, rule: &RuleId) -> u8 {
        self.states
            .get(&(device.clone(), rule.clone()))
            .map_or(0, |s| s.level)
    }

    /// Evaluates one reading against one rule at server time `now`, returning the change
    /// of confirmed level. `key` is the reading's [`order_key`]; a reading with a key older
    /// than the last one evaluated is ignored. The change takes effect only through
    /// [`Evaluator::commit`].
    pub fn evaluate(
        &mut self,
        device: &DeviceId,
        rule: &Rule,
        value: Value,
        ts: Timestamp,
        key: Timestamp,
        now: Timestamp,
    ) -> Option<LevelChange> {
        let state = self
            .states
            .entry((device.clone(), rule.id.clone()))
            .or_default();
        if state.last_key.is_some_and(|last| key < last) {
            return None;
        }
        state.last_key = Some(key);
        let observed = observed_level(rule, value, state.level);
        let from = state.level;

        let confirmed = if observed > state.level {
            if rule.min_duration.is_zero() {
                Some(observed)
            } else {
                // The pending level is the lowest level held since the wait began, so a
                // brief spike to level 2 inside a level 1 episode does not confirm level 2.
                let (pending_level, since) = match state.pending {
                    Some(pending) => (pending.level.min(observed), pending.since),
                    None => (observed, now),
                };
                let due = Timestamp(since.0.saturating_add(duration_millis(rule)));
                state.pending = Some(Pending {
                    level: pending_level,
                    since,
                    due,
                    value,
                    ts,
                });
                (now >= due).then_some(pending_level)
            }
        } else {
            state.pending = None;
            (observed < state.level).then_some(observed)
        };

        let to = confirmed?;
        if to == from {
            return None;
        }
        Some(LevelChange {
            device: device.clone(),
            rule: rule.id.clone(),
            from,
            to,
            value,
            ts,
        })
    }

    /// Returns the earliest server time at which a pending level is due, if any.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.states
            .values()
            .filter_map(|s| s.pending.map(|p| p.due))
            .min()
    }

    /// Returns the (device, rule) pairs whose pending level is due at server time `now`.
    pub fn due(&self, now: Timestamp) -> Vec<(DeviceId, RuleId)> {
        self.states
            .iter()
            .filter(|(_, s)| s.pending.is_some_and(|p| p.due <= now))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Confirms the pending level of a rule once it has been held for the rule's minimum
    /// duration at server time `now`, without a new reading. The change carries the value
    /// and timestamp of the last reading that kept the level pending, and takes effect
    /// only through [`Evaluator::commit`]. A pending level of a rule that no longer has a
    /// minimum duration is confirmed at once.
    pub fn confirm_due(
        &mut self,
        device: &DeviceId,
        rule: &Rule,
        now: Timestamp,
    ) -> Option<LevelChange> {
        let state = self.states.get_mut(&(device.clone(), rule.id.clone()))?;
        let pending = state.pending?;
        let due = Timestamp(pending.since.0.saturating_add(duration_millis(rule)));
        if pending.due != due {
            // The rule's minimum duration changed on a config reload.
            state.pending = Some(Pending { due, ..pending });
        }
        if now < due || pending.level <= state.level {
            return None;
        }
        Some(LevelChange {
            device: device.clone(),
            rule: rule.id.clone(),
            from: state.level,
            to: pending.level,
            value: pending.value,
            ts: pending.ts,
        })
    }

    /// Drops the pending level of a rule, as when the rule was removed.
    pub fn drop_pending(&mut self, device: &DeviceId, rule: &RuleId) {
        if let Some(state) = self.states.get_mut(&(device.clone(), rule.clone())) {
            state.pending = None;
        }
    }

    /// Makes a change returned by [`Evaluator::evaluate`] or [`Evaluator::confirm_due`] the
    /// rule's confirmed level. A change whose `from` is no longer the confirmed level is
    /// ignored.
    pub fn commit(&mut self, change: &LevelChange) {
        let Some(state) = self
            .states
            .get_mut(&(change.device.clone(), change.rule.clone()))
        else {
            return;
        };
        if state.level == change.from {
            state.level = change.to;
            state.pending = None;
        }
    }
}

fn duration_millis(rule: &Rule) -> i64 {
    i64::try_from(rule.min_duration.as_millis()).unwrap_or(i64::MAX)
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
        Condition::Threshold {
            above,
            level1,
            level2,
            deadband,
        } => {
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
            condition: Condition::Threshold {
                above: true,
                level1: Some(25.0),
                level2: Some(50.0),
                deadband: 2.0,
            },
            min_duration,
            description: String::new(),
        }
    }

    fn run(rule: &Rule, values: &[(i64, f64)]) -> Vec<(u8, u8)> {
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let mut changes = Vec::new();
        for (t, v) in values {
            if let Some(change) = evaluator.evaluate(
                &device,
                rule,
                Value::Number(*v),
                Timestamp(*t),
                Timestamp(*t),
                Timestamp(*t),
            ) {
                evaluator.commit(&change);
                changes.push((change.from, change.to));
            }
        }
        changes
    }

    #[test]
    fn raise_escalate_clear() {
        let rule = gas_rule(Duration::ZERO);
        let changes = run(
            &rule,
            &[
                (1, 10.0),
                (2, 26.0),
                (3, 51.0),
                (4, 49.0),
                (5, 24.0),
                (6, 22.9),
            ],
        );
        assert_eq!(changes, vec![(0, 1), (1, 2), (2, 1), (1, 0)]);
    }

    #[test]
    fn hovering_inside_deadband_changes_once() {
        let rule = gas_rule(Duration::ZERO);
        let values: Vec<(i64, f64)> = (0..100)
            .map(|i| (i, if i % 2 == 0 { 25.5 } else { 24.0 }))
            .collect();
        assert_eq!(run(&rule, &values), vec![(0, 1)]);
    }

    #[test]
    fn below_rule_mirrors_above() {
        let rule = Rule {
            condition: Condition::Threshold {
                above: false,
                level1: Some(19.5),
                level2: Some(18.0),
                deadband: 0.5,
            },
            ..gas_rule(Duration::ZERO)
        };
        let changes = run(
            &rule,
            &[(1, 20.9), (2, 19.4), (3, 19.8), (4, 17.9), (5, 20.1)],
        );
        assert_eq!(changes, vec![(0, 1), (1, 2), (2, 0)]);
    }

    #[test]
    fn min_duration_delays_raise() {
        let rule = gas_rule(Duration::from_secs(10));
        assert_eq!(run(&rule, &[(0, 30.0), (5_000, 30.0)]), vec![]);
        assert_eq!(
            run(&rule, &[(0, 30.0), (5_000, 30.0), (10_000, 30.0)]),
            vec![(0, 1)]
        );
        // A dip below the threshold restarts the wait.
        assert_eq!(
            run(
                &rule,
                &[(0, 30.0), (5_000, 10.0), (10_000, 30.0), (15_000, 30.0)]
            ),
            vec![]
        );
    }

    #[test]
    fn late_reading_changes_nothing() {
        let rule = gas_rule(Duration::ZERO);
        let changes = run(&rule, &[(10_000, 60.0), (5_000, 0.0), (11_000, 61.0)]);
        assert_eq!(
            changes,
            vec![(0, 2)],
            "the reading from before the alarm must not clear it"
        );
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
            let change = evaluator.evaluate(
                &device,
                &rule,
                Value::Number(30.0),
                Timestamp(ts),
                order_key(Timestamp(ts), Timestamp(now)),
                Timestamp(now),
            );
            change.inspect(|c| evaluator.commit(c))
        };
        assert!(step(0, 0).is_none());
        // The device's clock jumps 200 s ahead, but only 300 ms passed at the server.
        assert!(
            step(200_000, 300).is_none(),
            "a device clock running ahead must not skip the wait"
        );
        assert!(step(200_100, 10_000).is_some());
    }

    #[test]
    fn equals_rule_for_smoke() {
        let rule = Rule {
            id: RuleId::from("smoke"),
            metric: MetricName::from("smoke"),
            condition: Condition::State {
                equals: true,
                level: 2,
            },
            min_duration: Duration::ZERO,
            description: String::new(),
        };
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("smoke-01");
        let mut changes = Vec::new();
        for (t, v) in [(1, false), (2, true), (3, true), (4, false)] {
            if let Some(c) = evaluator.evaluate(
                &device,
                &rule,
                Value::Bool(v),
                Timestamp(t),
                Timestamp(t),
                Timestamp(t),
            ) {
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
            let change = evaluator.evaluate(
                &device,
                &rule,
                Value::Number(value),
                Timestamp(ts),
                Timestamp(ts),
                Timestamp(ts),
            );
            change.map(|c| (c.from, c.to))
        };
        assert_eq!(step(1, 30.0), Some((0, 1)));
        assert_eq!(
            step(2, 31.0),
            Some((0, 1)),
            "a raise that was not committed must be returned again"
        );
        assert_eq!(
            step(3, 10.0),
            None,
            "without a committed raise there is nothing to clear"
        );
    }

    #[test]
    fn uncommitted_raise_keeps_min_duration_wait() {
        let rule = gas_rule(Duration::from_secs(10));
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let value = Value::Number(30.0);
        assert!(
            evaluator
                .evaluate(
                    &device,
                    &rule,
                    value,
                    Timestamp(0),
                    Timestamp(0),
                    Timestamp(0)
                )
                .is_none()
        );
        let first = evaluator.evaluate(
            &device,
            &rule,
            value,
            Timestamp(10_000),
            Timestamp(10_000),
            Timestamp(10_000),
        );
        assert_eq!(first.as_ref().map(|c| c.to), Some(1));
        // The store failed, so the raise was not committed: the next reading raises at once
        // instead of waiting another `min_duration`.
        let again = evaluator.evaluate(
            &device,
            &rule,
            value,
            Timestamp(10_500),
            Timestamp(10_500),
            Timestamp(10_500),
        );
        assert_eq!(again.as_ref().map(|c| c.to), Some(1));
        evaluator.commit(&again.unwrap());
        assert_eq!(evaluator.level(&device, &rule.id), 1);
        assert!(
            evaluator
                .evaluate(
                    &device,
                    &rule,
                    value,
                    Timestamp(11_000),
                    Timestamp(11_000),
                    Timestamp(11_000)
                )
                .is_none()
        );
    }

    #[test]
    fn future_reading_does_not_block_later_ones() {
        let rule = gas_rule(Duration::ZERO);
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let mut step = |ts: i64, received: i64, value: f64| {
            let key = order_key(Timestamp(ts), Timestamp(received));
            let change = evaluator.evaluate(
                &device,
                &rule,
                Value::Number(value),
                Timestamp(ts),
                key,
                Timestamp(received),
            );
            change
                .inspect(|c| evaluator.commit(c))
                .map(|c| (c.from, c.to))
        };
        assert_eq!(step(1_000, 1_000, 10.0), None);
        // Dated 240 s ahead of the server's clock, inside the allowed skew.
        assert_eq!(step(241_000, 1_100, 5.0), None);
        assert_eq!(
            step(1_200, 1_200, 80.0),
            Some((0, 2)),
            "a reading after the future one must raise"
        );
    }

    #[test]
    fn restored_order_floor_ignores_older() {
        let rule = gas_rule(Duration::ZERO);
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        evaluator.restore(device.clone(), rule.id.clone(), 2);
        evaluator.restore_order(device.clone(), rule.id.clone(), Timestamp(10_000));
        let old = evaluator.evaluate(
            &device,
            &rule,
            Value::Number(0.0),
            Timestamp(5_000),
            Timestamp(5_000),
            Timestamp(20_000),
        );
        assert_eq!(
            old, None,
            "a reading older than the floor must not clear the restored level"
        );
        assert_eq!(evaluator.level(&device, &rule.id), 2);
        let new = evaluator.evaluate(
            &device,
            &rule,
            Value::Number(0.0),
            Timestamp(20_000),
            Timestamp(20_000),
            Timestamp(20_000),
        );
        assert_eq!(new.map(|c| c.to), Some(0));
    }

    #[test]
    fn restore_order_keeps_highest_floor() {
        let rule = gas_rule(Duration::ZERO);
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        evaluator.restore_order(device.clone(), rule.id.clone(), Timestamp(10_000));
        evaluator.restore_order(device.clone(), rule.id.clone(), Timestamp(3_000));
        let old = evaluator.evaluate(
            &device,
            &rule,
            Value::Number(60.0),
            Timestamp(5_000),
            Timestamp(5_000),
            Timestamp(20_000),
        );
        assert_eq!(old, None);
    }

    #[test]
    fn pending_level_confirms_without_reading() {
        let rule = gas_rule(Duration::from_secs(3));
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        let first = evaluator.evaluate(
            &device,
            &rule,
            Value::Number(55.0),
            Timestamp(900),
            Timestamp(900),
            Timestamp(1_000),
        );
        assert_eq!(first, None);
        assert_eq!(evaluator.next_due(), Some(Timestamp(4_000)));
        assert!(evaluator.due(Timestamp(3_999)).is_empty());
        assert_eq!(
            evaluator.confirm_due(&device, &rule, Timestamp(3_999)),
            None,
            "confirmed before the wait ended"
        );
        assert_eq!(
            evaluator.due(Timestamp(4_000)),
            vec![(device.clone(), rule.id.clone())]
        );
        let change = evaluator
            .confirm_due(&device, &rule, Timestamp(4_000))
            .unwrap();
        assert_eq!((change.from, change.to), (0, 2));
        assert_eq!(change.value, Value::Number(55.0));
        assert_eq!(
            change.ts,
            Timestamp(900),
            "the change carries the reading's timestamp"
        );
        evaluator.commit(&change);
        assert_eq!(evaluator.level(&device, &rule.id), 2);
        assert_eq!(evaluator.next_due(), None);
    }

    #[test]
    fn contradicted_pending_level_is_not_confirmed() {
        let rule = gas_rule(Duration::from_secs(3));
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        evaluator.evaluate(
            &device,
            &rule,
            Value::Number(55.0),
            Timestamp(1_000),
            Timestamp(1_000),
            Timestamp(1_000),
        );
        evaluator.evaluate(
            &device,
            &rule,
            Value::Number(10.0),
            Timestamp(2_000),
            Timestamp(2_000),
            Timestamp(2_000),
        );
        assert_eq!(evaluator.next_due(), None);
        assert_eq!(
            evaluator.confirm_due(&device, &rule, Timestamp(10_000)),
            None
        );
    }

    #[test]
    fn pending_keeps_lowest_level_when_due() {
        let rule = gas_rule(Duration::from_secs(3));
        let mut evaluator = Evaluator::default();
        let device = DeviceId::from("gas-01");
        evaluator.evaluate(
            &device,
            &rule,
            Value::Number(30.0),
            Timestamp(1_000),
            Timestamp(1_000),
            Timestamp(1_000),
        );
        evaluator.evaluate(
            &device,
            &rule,
            Value::Number(60.0),
            Timestamp(2_000),
            Timestamp(2_000),
            Timestamp(2_000),
        );
        let change = evaluator
            .confirm_due(&device, &rule, Timestamp(4_000))
            .unwrap();
        assert_eq!(
            change.to, 1,
            "a spike to level 2 inside the wait confirms only level 1"
        );
    }
}
