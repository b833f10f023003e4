//! Identifiers and readings shared by every pipeline stage.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }
    };
}

id_type!(
    /// Identifier of a site: an enterprise plant or a park building.
    SiteId
);
id_type!(
    /// Identifier of a device, unique across all sites.
    DeviceId
);
id_type!(
    /// Identifier of a threshold rule.
    RuleId
);
id_type!(
    /// Name of a metric, such as `gas_lel` or `smoke`.
    MetricName
);
id_type!(
    /// Name of a device profile, such as `gas-detector`.
    ProfileName
);

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// Formats the timestamp as RFC 3339 with millisecond precision.
    pub fn to_rfc3339(self) -> String {
        chrono::DateTime::from_timestamp_millis(self.0).map_or_else(
            || self.0.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// A metric value as a device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Number(f64),
}

impl Value {
    /// Returns the value as a number, with `true` as 1 and `false` as 0.
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Bool(b) => f64::from(u8::from(b)),
            Value::Number(n) => n,
        }
    }

    pub fn kind(self) -> ValueKind {
        match self {
            Value::Bool(_) => ValueKind::Bool,
            Value::Number(_) => ValueKind::Number,
        }
    }

    /// Rebuilds a value from its stored number and kind.
    pub fn from_stored(number: f64, kind: ValueKind) -> Value {
        match kind {
            ValueKind::Bool => Value::Bool(number != 0.0),
            ValueKind::Number => Value::Number(number),
        }
    }
}

/// Whether a series stores numbers or booleans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    Bool,
    Number,
}

/// Where a reading entered the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Mqtt,
    Modbus,
    HttpWrite,
}

/// One metric value of one device at one time, after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub site: SiteId,
    pub device: DeviceId,
    pub metric: MetricName,
    pub ts: Timestamp,
    pub value: Value,
    pub source: Source,
}
