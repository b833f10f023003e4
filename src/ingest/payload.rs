//! Decoding of MQTT topics and payloads into values, with a typed reason for every
//! rejection. Pure functions: no server state, so the decoder can be fuzzed and reused.
//!
//! Topics:
//! - `telemetry/{site}/{device}` with `{"ts": <optional>, "values": {"metric": value, ...}}`,
//!   where `ts` is epoch milliseconds or an RFC 3339 string;
//! - `telemetry/{site}/{device}/{metric}` with a bare number or `true` / `false`;
//! - `status/{site}/{device}` with `online` or `offline` (plain or as `{"status": ...}`).

use crate::model::{DeviceId, MetricName, SiteId, Timestamp, Value};

/// Most metrics accepted in one telemetry message.
pub const MAX_VALUES_PER_MESSAGE: usize = 256;

/// Reason an input was rejected, the label of `stonelion_ingest_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    TopicInvalid,
    PayloadTooLarge,
    NotUtf8,
    MalformedJson,
    NotAnObject,
    ValuesMissing,
    TooManyValues,
    ValueInvalid,
    NonFinite,
    TimestampInvalid,
    TimestampTooOld,
    TimestampInFuture,
    UnknownSite,
    UnknownDevice,
    SiteMismatch,
    UnknownMetric,
    WrongType,
    StatusInvalid,
    PipelineBusy,
    ProfileMismatch,
    ReservedMeasurement,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TopicInvalid => "topic_invalid",
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::ValuesMissing => "values_missing",
            RejectReason::TooManyValues => "too_many_values",
            RejectReason::ValueInvalid => "value_invalid",
            RejectReason::NonFinite => "non_finite",
            RejectReason::TimestampInvalid => "timestamp_invalid",
            RejectReason::TimestampTooOld => "timestamp_too_old",
            RejectReason::TimestampInFuture => "timestamp_in_future",
            RejectReason::UnknownSite => "unknown_site",
            RejectReason::UnknownDevice => "unknown_device",
            RejectReason::SiteMismatch => "site_mismatch",
            RejectReason::UnknownMetric => "unknown_metric",
            RejectReason::WrongType => "wrong_type",
            RejectReason::StatusInvalid => "status_invalid",
            RejectReason::PipelineBusy => "pipeline_busy",
            RejectReason::ProfileMismatch => "profile_mismatch",
            RejectReason::ReservedMeasurement => "reserved_measurement",
        }
    }
}

/// A rejection: its reason and a message that names the value and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Target of a topic: telemetry or status of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicKind {
    /// `telemetry/{site}/{device}`, or with a fourth level naming one metric.
    Telemetry {
        site: SiteId,
        device: DeviceId,
        metric: Option<MetricName>,
    },
    /// `status/{site}/{device}`.
    Status { site: SiteId, device: DeviceId },
}

/// Parses a topic, rejecting wildcards, empty levels and unknown prefixes.
pub fn parse_topic(topic: &str) -> Result<TopicKind, Rejection> {
    let levels: Vec<&str> = topic.split('/').collect();
    let invalid = |why: &str| {
        Rejection::new(
            RejectReason::TopicInvalid,
            format!(
                "topic `{}` {why}; publish to telemetry/{{site}}/{{device}}, \
                 telemetry/{{site}}/{{device}}/{{metric}} or status/{{site}}/{{device}}",
                truncate(topic, 128)
            ),
        )
    };
    let level_ok = |level: &str| crate::config::check_id(level).is_ok();
    if levels.iter().skip(1).any(|l| !level_ok(l)) {
        return Err(invalid("has an empty or invalid level"));
    }
    match levels.as_slice() {
        ["telemetry", site, device] => Ok(TopicKind::Telemetry {
            site: SiteId::from(*site),
            device: DeviceId::from(*device),
            metric: None,
        }),
        ["telemetry", site, device, metric] => Ok(TopicKind::Telemetry {
            site: SiteId::from(*site),
            device: DeviceId::from(*device),
            metric: Some(MetricName::from(*metric)),
        }),
        ["status", site, device] => Ok(TopicKind::Status {
            site: SiteId::from(*site),
            device: DeviceId::from(*device),
        }),
        _ => Err(invalid("is not a Stonelion topic")),
    }
}

/// Values of one telemetry message before they are checked against the device.
#[derive(Clone, Debug, PartialEq)]
pub struct Telemetry {
    pub ts: Option<Timestamp>,
    /// Values that decoded; a value that did not is in `rejected` and does not stop the rest.
    pub values: Vec<(MetricName, Value)>,
    pub rejected: Vec<Rejection>,
}

/// Decodes a `telemetry/{site}/{device}` JSON payload.
pub fn decode_telemetry(payload: &[u8]) -> Result<Telemetry, Rejection> {
    let text = std::str::from_utf8(payload).map_err(|_| {
        Rejection::new(
            RejectReason::NotUtf8,
            "payload is not UTF-8; send JSON text",
        )
    })?;
    let json = serde_json::from_str::<super::unique_json::UniqueKeys>(text)
        .map(|unique| unique.0)
        .map_err(|e| {
            Rejection::new(
                RejectReason::MalformedJson,
                format!(
                    "payload is not valid JSON ({e}); send {{\"values\": {{\"metric\": 1.5}}}}"
                ),
            )
        })?;
    let serde_json::Value::Object(mut object) = json else {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            format!(
                "payload is JSON {}, not an object; send {{\"values\": {{...}}}}",
                json_kind(&json)
            ),
        ));
    };
    let ts = match object.remove("ts") {
        None | Some(serde_json::Value::Null) => None,
        Some(ts) => Some(decode_timestamp(&ts)?),
    };
    let Some(values) = object.remove("values") else {
        return Err(Rejection::new(
            RejectReason::ValuesMissing,
            "payload has no `values` object; send {\"values\": {\"metric\": 1.5}}",
        ));
    };
    if let Some(extra) = object.keys().next() {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            format!(
                "unknown key `{}` in payload; only `ts` and `values` are allowed",
                truncate(extra, 64)
            ),
        ));
    }
    let serde_json::Value::Object(values) = values else {
        return Err(Rejection::new(
            RejectReason::ValuesMissing,
            format!(
                "`values` is JSON {}, not an object of metric names to values",
                json_kind(&values)
            ),
        ));
    };
    if values.is_empty() {
        return Err(Rejection::new(
            RejectReason::ValuesMissing,
            "`values` is empty; send at least one metric",
        ));
    }
    if values.len() > MAX_VALUES_PER_MESSAGE {
        return Err(Rejection::new(
            RejectReason::TooManyValues,
            format!(
                "{} values in one message; send at most {MAX_VALUES_PER_MESSAGE}",
                values.len()
            ),
        ));
    }

    let mut telemetry = Telemetry {
        ts,
        values: Vec::with_capacity(values.len()),
        rejected: Vec::new(),
    };
    for (name, value) in values {
        match decode_json_value(&name, &value) {
            Ok(v) => telemetry.values.push((MetricName::new(name), v)),
            Err(rejection) => telemetry.rejected.push(rejection),
        }
    }
    Ok(telemetry)
}

fn decode_json_value(name: &str, value: &serde_json::Value) -> Result<Value, Rejection> {
    if crate::config::check_id(name).is_err() {
        return Err(Rejection::new(
            RejectReason::ValueInvalid,
            format!(
                "metric name `{}` is invalid; use letters, digits, `-`, `_` or `.`",
                truncate(name, 64)
            ),
        ));
    }
    match value {
        serde_json::Value::Bool(b) => Ok(Value::Bool(*b)),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(Value::Number(f)),
            _ => Err(Rejection::new(
                RejectReason::NonFinite,
                format!("metric `{name}` value {n} is not a finite number"),
            )),
        },
        other => Err(Rejection::new(
            RejectReason::ValueInvalid,
            format!(
                "metric `{name}` is JSON {}; send a number or a boolean",
                json_kind(other)
            ),
        )),
    }
}

/// Decodes a bare value for `telemetry/{site}/{device}/{metric}`.
pub fn decode_bare_value(metric: &MetricName, payload: &[u8]) -> Result<Value, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| {
            Rejection::new(
                RejectReason::NotUtf8,
                "payload is not UTF-8; send a number or true/false",
            )
        })?
        .trim();
    match text {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(Value::Number(n)),
        Ok(_) => Err(Rejection::new(
            RejectReason::NonFinite,
            format!(
                "metric `{metric}` value `{}` is not a finite number",
                truncate(text, 32)
            ),
        )),
        Err(_) => Err(Rejection::new(
            RejectReason::ValueInvalid,
            format!(
                "metric `{metric}` value `{}` is not a number or true/false",
                truncate(text, 32)
            ),
        )),
    }
}

/// Decodes a `status/{site}/{device}` payload into `true` for online.
pub fn decode_status(payload: &[u8]) -> Result<bool, Rejection> {
    let text = std::str::from_utf8(payload).unwrap_or("").trim();
    let word = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => {
            o.get("status").and_then(|s| s.as_str()).map(str::to_owned)
        }
        _ => Some(text.to_owned()),
    };
    match word.as_deref() {
        Some("online") => Ok(true),
        Some("offline") => Ok(false),
        _ => Err(Rejection::new(
            RejectReason::StatusInvalid,
            format!(
                "status payload `{}` is invalid; send `online` or `offline`",
                truncate(text, 32)
            ),
        )),
    }
}

fn decode_timestamp(ts: &serde_json::Value) -> Result<Timestamp, Rejection> {
    let invalid = || {
        Rejection::new(
            RejectReason::TimestampInvalid,
            format!(
                "`ts` {} is invalid; send epoch milliseconds as an integer or an RFC 3339 string",
                truncate(&ts.to_string(), 40)
            ),
        )
    };
    match ts {
        serde_json::Value::Number(n) => n.as_i64().map(Timestamp).ok_or_else(invalid),
        serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Timestamp(t.timestamp_millis()))
            .map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

/// Checks a timestamp against the accepted window around `now`.
pub fn check_timestamp(
    ts: Timestamp,
    now: Timestamp,
    max_age_ms: i64,
    max_skew_ms: i64,
) -> Result<(), Rejection> {
    if ts.0 < now.0.saturating_sub(max_age_ms) {
        let hint = if ts.0.unsigned_abs() < 100_000_000_000 {
            "; it looks like seconds or a clock reset to 1970, send epoch milliseconds from a synchronised clock"
        } else {
            "; check the device clock"
        };
        return Err(Rejection::new(
            RejectReason::TimestampTooOld,
            format!(
                "timestamp {} ({ts}) is older than the accepted age{hint}",
                ts.0
            ),
        ));
    }
    if ts.0 > now.0.saturating_add(max_skew_ms) {
        return Err(Rejection::new(
            RejectReason::TimestampInFuture,
            format!(
                "timestamp {} ({ts}) is in the future beyond the allowed clock skew; check the device clock",
                ts.0
            ),
        ));
    }
    Ok(())
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Shortens text for log messages, on a character boundary.
pub fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(max_chars).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_with_epoch_millis() {
        let t = decode_telemetry(
            br#"{"ts": 1700000000123, "values": {"gas_lel": 12.5, "smoke": false}}"#,
        )
        .unwrap();
        assert_eq!(t.ts, Some(Timestamp(1_700_000_000_123)));
        assert_eq!(t.values.len(), 2);
        assert!(
            t.values
                .contains(&(MetricName::from("gas_lel"), Value::Number(12.5)))
        );
        assert!(
            t.values
                .contains(&(MetricName::from("smoke"), Value::Bool(false)))
        );
    }

    #[test]
    fn telemetry_with_rfc3339() {
        let t = decode_telemetry(br#"{"ts": "2026-01-02T03:04:05.5+08:00", "values": {"x": 1}}"#)
            .unwrap();
        assert_eq!(t.ts, Some(Timestamp(1_767_294_245_500)));
    }

    #[test]
    fn telemetry_keeps_good_values_beside_bad() {
        let t = decode_telemetry(br#"{"values": {"a": 1, "b": "high", "c": null}}"#).unwrap();
        assert_eq!(t.values, vec![(MetricName::from("a"), Value::Number(1.0))]);
        assert_eq!(t.rejected.len(), 2);
        assert!(
            t.rejected
                .iter()
                .all(|r| r.reason == RejectReason::ValueInvalid)
        );
    }

    #[test]
    fn malformed_payloads_rejected_by_reason() {
        let cases: &[(&[u8], RejectReason)] = &[
            (b"{", RejectReason::MalformedJson),
            (b"[1,2]", RejectReason::NotAnObject),
            (b"\xff\xfe", RejectReason::NotUtf8),
            (br#"{"ts": 1}"#, RejectReason::ValuesMissing),
            (br#"{"values": {}}"#, RejectReason::ValuesMissing),
            (br#"{"values": 5}"#, RejectReason::ValuesMissing),
            (
                br#"{"ts": "yesterday", "values": {"a": 1}}"#,
                RejectReason::TimestampInvalid,
            ),
            (
                br#"{"ts": 1.5, "values": {"a": 1}}"#,
                RejectReason::TimestampInvalid,
            ),
            (
                br#"{"values": {"a": 1}, "extra": 2}"#,
                RejectReason::NotAnObject,
            ),
            (br#"{"values": {"a": 1e999}}"#, RejectReason::MalformedJson),
        ];
        for (payload, reason) in cases {
            let error = decode_telemetry(payload).unwrap_err();
            assert_eq!(
                error.reason,
                *reason,
                "payload {:?}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn bare_values() {
        let m = MetricName::from("gas_lel");
        assert_eq!(
            decode_bare_value(&m, b" 12.5\n").unwrap(),
            Value::Number(12.5)
        );
        assert_eq!(decode_bare_value(&m, b"true").unwrap(), Value::Bool(true));
        assert_eq!(
            decode_bare_value(&m, b"NaN").unwrap_err().reason,
            RejectReason::NonFinite
        );
        assert_eq!(
            decode_bare_value(&m, b"inf").unwrap_err().reason,
            RejectReason::NonFinite
        );
        assert_eq!(
            decode_bare_value(&m, b"12,5").unwrap_err().reason,
            RejectReason::ValueInvalid
        );
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("telemetry/plant-a/gas-01").unwrap(),
            TopicKind::Telemetry {
                site: "plant-a".into(),
                device: "gas-01".into(),
                metric: None
            }
        );
        assert!(matches!(
            parse_topic("telemetry/a/b/gas_lel").unwrap(),
            TopicKind::Telemetry {
                metric: Some(_),
                ..
            }
        ));
        assert!(matches!(
            parse_topic("status/a/b").unwrap(),
            TopicKind::Status { .. }
        ));
        for bad in [
            "telemetry/a",
            "telemetry//b",
            "other/a/b",
            "telemetry/a/b/c/d",
            "telemetry/a/b c",
        ] {
            assert_eq!(
                parse_topic(bad).unwrap_err().reason,
                RejectReason::TopicInvalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn timestamp_window() {
        let now = Timestamp(1_800_000_000_000);
        let day = 86_400_000;
        assert!(check_timestamp(now, now, 7 * day, 300_000).is_ok());
        let e = check_timestamp(Timestamp(1_800_000_000), now, 7 * day, 300_000).unwrap_err();
        assert_eq!(e.reason, RejectReason::TimestampTooOld);
        assert!(e.message.contains("seconds"), "{}", e.message);
        let e = check_timestamp(Timestamp(now.0 + 600_000), now, 7 * day, 300_000).unwrap_err();
        assert_eq!(e.reason, RejectReason::TimestampInFuture);
    }

    #[test]
    fn status_payloads() {
        assert!(decode_status(b"online").unwrap());
        assert!(!decode_status(br#"{"status":"offline"}"#).unwrap());
        assert_eq!(
            decode_status(b"maybe").unwrap_err().reason,
            RejectReason::StatusInvalid
        );
    }
}
