//! Threshold rules as written in profiles and configs, and their checked form.

use std::time::Duration;

use serde::Deserialize;

use crate::model::{MetricName, RuleId};

/// How a rule compares a metric with its thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// Alarm when the value rises to or past a threshold.
    Above,
    /// Alarm when the value falls to or below a threshold.
    Below,
    /// Alarm when a boolean metric equals `equals`, such as smoke detected.
    Equals,
}

/// A threshold rule as written in a device profile or a device's config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Rule id, unique within one profile or device; a device rule with the same id as a
    /// profile rule replaces it for that device.
    pub id: RuleId,
    /// Metric the rule watches.
    pub metric: MetricName,
    /// `above`, `below` or `equals`.
    pub kind: RuleKind,
    /// Level 1 threshold (for `above` and `below`); at least one level must be set.
    pub level1: Option<f64>,
    /// Level 2 threshold (for `above` and `below`), beyond level 1.
    pub level2: Option<f64>,
    /// Distance the value must move back past a threshold before the level drops, so a
    /// value hovering at a threshold raises one alarm. In the metric's unit.
    #[serde(default)]
    pub deadband: f64,
    /// Boolean value that raises the alarm (for `equals`).
    pub equals: Option<bool>,
    /// Alarm level raised by an `equals` rule: 1 or 2.
    pub level: Option<u8>,
    /// How long the condition must hold before the alarm is raised, such as `"10s"`.
    #[serde(default, with = "humantime_serde")]
    pub min_duration: Option<Duration>,
    /// Text for operators, carried in alarms and webhooks.
    #[serde(default)]
    pub description: String,
}

/// What a checked rule compares.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// Thresholds for levels 1 and 2; at least one is set.
    Threshold {
        above: bool,
        level1: Option<f64>,
        level2: Option<f64>,
        deadband: f64,
    },
    /// A boolean state that raises one level.
    State { equals: bool, level: u8 },
}

/// A checked rule, ready for evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub id: RuleId,
    pub metric: MetricName,
    pub condition: Condition,
    pub min_duration: Duration,
    pub description: String,
}

impl Rule {
    /// The threshold for `level`, or for `equals` rules the raising state as 1 or 0.
    pub fn threshold(&self, level: u8) -> Option<f64> {
        match &self.condition {
            Condition::Threshold { level1, level2, .. } => {
                if level >= 2 {
                    level2.or(*level1)
                } else {
                    level1.or(*level2)
                }
            }
            Condition::State { equals, .. } => Some(f64::from(u8::from(*equals))),
        }
    }
}

impl RuleSpec {
    /// Checks the spec, returning the rule or a list of (key, message) problems.
    pub fn check(&self) -> Result<Rule, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let condition = match self.kind {
            RuleKind::Above | RuleKind::Below => self.check_threshold(&mut problems),
            RuleKind::Equals => self.check_state(&mut problems),
        };
        if !self.deadband.is_finite() || self.deadband < 0.0 {
            problems.push((
                "deadband",
                format!(
                    "deadband {} is invalid; write a number of 0 or more",
                    self.deadband
                ),
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Rule {
            id: self.id.clone(),
            metric: self.metric.clone(),
            condition: condition.expect("no problems means a condition"),
            min_duration: self.min_duration.unwrap_or_default(),
            description: self.description.clone(),
        })
    }

    fn check_threshold(&self, problems: &mut Vec<(&'static str, String)>) -> Option<Condition> {
        let above = self.kind == RuleKind::Above;
        if self.level1.is_none() && self.level2.is_none() {
            problems.push((
                "level1",
                "a threshold rule needs level1, level2 or both".to_owned(),
            ));
        }
        for (key, value) in [("level1", self.level1), ("level2", self.level2)] {
            if value.is_some_and(|v| !v.is_finite()) {
                problems.push((key, format!("{key} must be a finite number")));
            }
        }
        if let (Some(l1), Some(l2)) = (self.level1, self.level2) {
            let ordered = if above { l2 > l1 } else { l2 < l1 };
            if !ordered {
                let (relation, kind) = if above {
                    ("greater", "above")
                } else {
                    ("less", "below")
                };
                problems.push((
                    "level2",
                    format!(
                        "level2 ({l2}) must be {relation} than level1 ({l1}) for an `{kind}` rule"
                    ),
                ));
            }
        }
        if self.equals.is_some() || self.level.is_some() {
            problems.push((
                "equals",
                "`equals` and `level` belong to `kind = \"equals\"` rules; remove them".to_owned(),
            ));
        }
        Some(Condition::Threshold {
            above,
            level1: self.level1,
            level2: self.level2,
            deadband: self.deadband,
        })
    }

    fn check_state(&self, problems: &mut Vec<(&'static str, String)>) -> Option<Condition> {
        let Some(equals) = self.equals else {
            problems.push((
                "equals",
                "an equals rule needs `equals = true` or `false`".to_owned(),
            ));
            return None;
        };
        let level = self.level.unwrap_or(2);
        if !(1..=2).contains(&level) {
            problems.push(("level", format!("level {level} is invalid; write 1 or 2")));
        }
        if self.level1.is_some() || self.level2.is_some() {
            problems.push((
                "level1",
                "level1 and level2 belong to above and below rules; use `level` here".to_owned(),
            ));
        }
        Some(Condition::State { equals, level })
    }
}
