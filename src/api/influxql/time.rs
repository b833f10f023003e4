//! Time literals and time output in the forms InfluxDB 1.x reads and writes.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};

/// Parses a time string of a `WHERE time` condition to nanoseconds since the epoch.
///
/// Accepts RFC 3339 (`2024-05-01T08:00:00Z`, `2024-05-01T08:00:00.5+08:00`) and, like
/// InfluxDB, `2024-05-01 08:00:00[.fraction]` and `2024-05-01`, both taken as UTC.
pub fn parse_time_string(text: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return t.timestamp_nanos_opt();
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f") {
        return t.and_utc().timestamp_nanos_opt();
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_nanos_opt()
}

/// The `epoch` query parameter: integer timestamps in this unit instead of RFC 3339 text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epoch {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Epoch {
    /// Parses the `epoch` parameter; InfluxDB accepts `ns`, `u`, `µ`, `ms`, `s`, `m`, `h`.
    pub fn from_param(param: &str) -> Option<Epoch> {
        Some(match param {
            "ns" | "n" => Epoch::Nanoseconds,
            "u" | "µ" | "us" => Epoch::Microseconds,
            "ms" => Epoch::Milliseconds,
            "s" => Epoch::Seconds,
            "m" => Epoch::Minutes,
            "h" => Epoch::Hours,
            _ => return None,
        })
    }

    fn divisor(self) -> i64 {
        match self {
            Epoch::Nanoseconds => 1,
            Epoch::Microseconds => 1_000,
            Epoch::Milliseconds => 1_000_000,
            Epoch::Seconds => 1_000_000_000,
            Epoch::Minutes => 60_000_000_000,
            Epoch::Hours => 3_600_000_000_000,
        }
    }

    /// Converts nanoseconds to this unit, truncating toward zero as InfluxDB does.
    pub fn convert(self, ns: i64) -> i64 {
        ns / self.divisor()
    }
}

/// Formats nanoseconds as Go's RFC 3339 with nanoseconds and trailing zeros trimmed
/// (`2024-05-01T08:00:00Z`, `2024-05-01T08:00:00.25Z`), in UTC or in `tz`'s local time.
pub fn format_time(ns: i64, tz: Option<chrono_tz::Tz>) -> String {
    let utc = Utc.timestamp_nanos(ns);
    match tz {
        None => trim_fraction(&utc.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()),
        Some(tz) => {
            let local = utc.with_timezone(&tz);
            let offset: FixedOffset = local.offset().fix();
            let text = local
                .with_timezone(&offset)
                .format("%Y-%m-%dT%H:%M:%S%.9f%:z")
                .to_string();
            let text = trim_fraction(&text);
            if offset.local_minus_utc() == 0 {
                text.replace("+00:00", "Z")
            } else {
                text
            }
        }
    }
}

/// Removes trailing zeros of the nine-digit fraction, and the dot when nothing is left.
fn trim_fraction(text: &str) -> String {
    let Some(dot) = text.find('.') else {
        return text.to_owned();
    };
    let fraction_end = dot + 10;
    let fraction = text[dot + 1..fraction_end].trim_end_matches('0');
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..dot]);
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out.push_str(&text[fraction_end..]);
    out
}

/// The offset in nanoseconds that `tz` adds to UTC at the instant `ns`.
pub fn zone_offset_nanos(tz: chrono_tz::Tz, ns: i64) -> i64 {
    let local = Utc.timestamp_nanos(ns).with_timezone(&tz);
    i64::from(local.offset().fix().local_minus_utc()) * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_space_forms_parse() {
        assert_eq!(
            parse_time_string("1970-01-01T00:00:01Z"),
            Some(1_000_000_000)
        );
        assert_eq!(
            parse_time_string("1970-01-01T08:00:01+08:00"),
            Some(1_000_000_000)
        );
        assert_eq!(
            parse_time_string("1970-01-01 00:00:00.5"),
            Some(500_000_000)
        );
        assert_eq!(parse_time_string("1970-01-02"), Some(86_400_000_000_000));
        assert_eq!(parse_time_string("yesterday"), None);
    }

    #[test]
    fn format_trims_fraction() {
        assert_eq!(format_time(0, None), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(250_000_000, None), "1970-01-01T00:00:00.25Z");
        assert_eq!(format_time(1, None), "1970-01-01T00:00:00.000000001Z");
    }

    #[test]
    fn format_in_time_zone() {
        let text = format_time(0, Some(chrono_tz::Asia::Shanghai));
        assert_eq!(text, "1970-01-01T08:00:00+08:00");
        assert_eq!(format_time(0, Some(chrono_tz::UTC)), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn epoch_truncates() {
        assert_eq!(Epoch::Milliseconds.convert(1_999_999), 1);
        assert_eq!(Epoch::Seconds.convert(59_000_000_000), 59);
        assert_eq!(Epoch::from_param("x"), None);
    }
}
