//! Alarm events: what the alarm stage emits for every transition, and what webhooks carry.

use serde::{Deserialize, Serialize};

/// Kind of an alarm event, as sent in the `X-Stonelion-Event` header and the body's `event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "alarm.raised")]
    Raised,
    #[serde(rename = "alarm.escalated")]
    Escalated,
    #[serde(rename = "alarm.acknowledged")]
    Acknowledged,
    #[serde(rename = "alarm.cleared")]
    Cleared,
    #[serde(rename = "alarm.closed")]
    Closed,
    /// An operator returned an active alarm to cleared by hand (`POST .../reset`).
    #[serde(rename = "alarm.reset")]
    Reset,
    #[serde(rename = "device.offline")]
    DeviceOffline,
    #[serde(rename = "device.online")]
    DeviceOnline,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::Raised,
        EventKind::Escalated,
        EventKind::Acknowledged,
        EventKind::Cleared,
        EventKind::Closed,
        EventKind::Reset,
        EventKind::DeviceOffline,
        EventKind::DeviceOnline,
    ];

    /// The name used in headers, bodies and config files.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "alarm.raised",
            EventKind::Escalated => "alarm.escalated",
            EventKind::Acknowledged => "alarm.acknowledged",
            EventKind::Cleared => "alarm.cleared",
            EventKind::Closed => "alarm.closed",
            EventKind::Reset => "alarm.reset",
            EventKind::DeviceOffline => "device.offline",
            EventKind::DeviceOnline => "device.online",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One event ready for delivery: its kind, the alarm it belongs to, and the JSON body.
///
/// Events of one alarm are delivered in the order they were created.
#[derive(Clone, Debug, PartialEq)]
pub struct AlarmEvent {
    pub kind: EventKind,
    /// The alarm's id, which orders deliveries per alarm.
    pub alarm_id: String,
    /// The full JSON body, serialized once so every retry sends the same bytes.
    pub body: Vec<u8>,
}
