//! Alarms tracked like work orders: raised, escalated, acknowledged, cleared and closed
//! with a note. Every transition is stored with its time, actor and value.
//!
//! [`manager`] owns the alarm state and applies rule level changes and operator actions in
//! one task; [`store`] keeps alarms, their history and the webhook outbox in one SQLite
//! database so a transition and its deliveries commit together.

pub mod event;
pub mod manager;
pub mod store;

use serde_json::json;

use crate::model::{DeviceId, MetricName, RuleId, SiteId, Timestamp};
pub use event::{AlarmEvent, EventKind};

/// Rule id of the alarm raised when a device goes offline.
pub const OFFLINE_RULE: &str = "device-offline";

/// Numeric alarm id, as shown in the API and webhooks.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct AlarmId(pub i64);

impl std::fmt::Display for AlarmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where an alarm is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlarmState {
    /// The condition holds.
    Active,
    /// The condition no longer holds, but nobody closed the alarm yet.
    Cleared,
    /// An operator closed the alarm; it is history.
    Closed,
}

impl AlarmState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Active => "active",
            AlarmState::Cleared => "cleared",
            AlarmState::Closed => "closed",
        }
    }

    pub fn parse(text: &str) -> Option<AlarmState> {
        [AlarmState::Active, AlarmState::Cleared, AlarmState::Closed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// What raised an alarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlarmKind {
    /// A threshold or state rule on a metric.
    Rule,
    /// The device went offline.
    Offline,
}

impl AlarmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::Rule => "rule",
            AlarmKind::Offline => "offline",
        }
    }
}

/// Who did an operator action, when, and with which note.
#[derive(Clone, Debug, PartialEq)]
pub struct Signoff {
    pub by: String,
    pub at: Timestamp,
    pub note: Option<String>,
}

/// One stored transition of an alarm.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub event: EventKind,
    pub at: Timestamp,
    /// `rule:{id}` or `system` for automatic transitions, the operator otherwise.
    pub actor: String,
    pub level: u8,
    pub value: Option<f64>,
    pub note: Option<String>,
}

/// An alarm with its history.
#[derive(Clone, Debug, PartialEq)]
pub struct Alarm {
    pub id: AlarmId,
    pub rule: RuleId,
    pub kind: AlarmKind,
    pub site: SiteId,
    pub device: DeviceId,
    pub metric: Option<MetricName>,
    pub unit: Option<String>,
    /// Highest level reached while open: 1 or 2.
    pub level: u8,
    pub state: AlarmState,
    pub acknowledged: Option<Signoff>,
    pub closed: Option<Signoff>,
    /// Value at the latest automatic transition.
    pub value: Option<f64>,
    /// Threshold of the current level.
    pub threshold: Option<f64>,
    pub raised_at: Timestamp,
    pub updated_at: Timestamp,
    pub cleared_at: Option<Timestamp>,
    pub description: String,
    pub history: Vec<Transition>,
}

impl Alarm {
    /// Renders the alarm as the API and webhooks show it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "id": self.id.0,
            "rule": self.rule,
            "kind": self.kind.as_str(),
            "site": self.site,
            "device": self.device,
            "metric": self.metric,
            "unit": self.unit,
            "level": self.level,
            "state": self.state.as_str(),
            "acknowledged": self.acknowledged.as_ref().map(signoff_json),
            "closed": self.closed.as_ref().map(signoff_json),
            "value": self.value,
            "threshold": self.threshold,
            "raised_at": self.raised_at.to_rfc3339(),
            "updated_at": self.updated_at.to_rfc3339(),
            "cleared_at": self.cleared_at.map(Timestamp::to_rfc3339),
            "description": self.description,
            "history": self.history.iter().map(transition_json).collect::<Vec<_>>(),
        })
    }
}

fn signoff_json(signoff: &Signoff) -> serde_json::Value {
    json!({ "by": signoff.by, "at": signoff.at.to_rfc3339(), "note": signoff.note })
}

fn transition_json(transition: &Transition) -> serde_json::Value {
    json!({
        "event": transition.event.as_str(),
        "at": transition.at.to_rfc3339(),
        "actor": transition.actor,
        "level": transition.level,
        "value": transition.value,
        "note": transition.note,
    })
}
