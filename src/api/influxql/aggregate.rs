//! Aggregate rows: windows from `GROUP BY time(interval, offset)` and `tz()`, one
//! aggregate per window and column, fill of empty windows, and transforms over windows.

use std::collections::BTreeMap;

use crate::model::Value;

use super::ast::Fill;
use super::condition::TimeRange;
use super::functions::{self, Aggregated};
use super::limits::Budget;
use super::response::Cell;
use super::select::{
    Column, ColumnSource, Group, call_field, field_points, is_count, is_selector_column,
    is_windowed_transform, window_call,
};
use super::time::zone_offset_nanos;

/// The statement settings that shape windows.
pub struct Window {
    pub range: TimeRange,
    pub now_ns: i64,
    /// `(interval, offset)` in nanoseconds.
    pub group_by_time: Option<(i64, i64)>,
    pub time_zone: Option<chrono_tz::Tz>,
    pub fill: Fill,
}

impl Window {
    /// The start of the window containing `t`. Windows are aligned to the epoch plus the
    /// offset, in local time when `tz()` is set.
    fn start_of(&self, t: i64, interval: i64, offset: i64) -> i64 {
        // NOTE: the zone offset is taken at `t`, so a window that spans a daylight saving
        // change is aligned by the offset at the instant being placed.
        let zone = self.time_zone.map_or(0, |tz| zone_offset_nanos(tz, t));
        let local = t.saturating_add(zone).saturating_sub(offset);
        local
            .div_euclid(interval)
            .saturating_mul(interval)
            .saturating_add(offset)
            .saturating_sub(zone)
    }

    /// Number of windows of `interval` from the window containing `min` to `max`, for
    /// windows without `tz()`, whose starts are evenly spaced.
    pub fn count(&self, min: i64, max: i64, interval: i64, offset: i64) -> u64 {
        let first = self.start_of(min, interval, offset);
        if max < first {
            return 0;
        }
        let span = i128::from(max) - i128::from(first);
        u64::try_from(span / i128::from(interval) + 1).unwrap_or(u64::MAX)
    }

    /// Window start times covering the range, empty when the group has no points. The
    /// windows are charged to `budget` and checked against it before they are allocated.
    fn starts(&self, first_point: Option<i64>, budget: &Budget) -> Result<Vec<i64>, String> {
        let Some(first_point) = first_point else {
            return Ok(Vec::new());
        };
        let Some((interval, offset)) = self.group_by_time else {
            let start = if self.range.has_min() {
                self.range.min
            } else {
                0
            };
            budget.charge_buckets(1)?;
            return Ok(vec![start]);
        };
        let min = if self.range.has_min() {
            self.range.min
        } else {
            first_point
        };
        let max = if self.range.has_max() {
            self.range.max
        } else {
            self.now_ns.max(first_point)
        };
        let remaining = budget.remaining_buckets();
        if self.time_zone.is_none() {
            budget.check_buckets(self.count(min, max, interval, offset), 1)?;
        }
        let mut starts = Vec::new();
        let mut start = self.start_of(min, interval, offset);
        while start <= max {
            if starts.len() as u64 == remaining {
                let needed = format!("more than {remaining}");
                return Err(budget.buckets_error(&needed, ""));
            }
            starts.push(start);
            let next = self.start_of(start.saturating_add(interval), interval, offset);
            start = if next > start {
                next
            } else {
                start.saturating_add(interval)
            };
        }
        budget.charge_buckets(starts.len() as u64)?;
        Ok(starts)
    }
}

/// One column's per-window results.
struct ColumnValues {
    values: Vec<Option<Value>>,
    selected_times: Vec<Option<i64>>,
    /// Whether each window held at least one input point.
    has_points: Vec<bool>,
}

/// The input of one column of an aggregate statement.
pub enum ColumnInput {
    /// Raw points of the column's field, in time order.
    Points(Vec<(i64, Value)>),
    /// The column's aggregate per window start, computed by the store.
    Windows(BTreeMap<i64, Value>),
    /// A column without a function call.
    Empty,
}

impl ColumnInput {
    fn first_time(&self) -> Option<i64> {
        match self {
            ColumnInput::Points(points) => points.first().map(|p| p.0),
            ColumnInput::Windows(windows) => windows.keys().next().copied(),
            ColumnInput::Empty => None,
        }
    }
}

/// Computes the rows of one output series of an aggregate statement from raw points.
pub fn rows(
    group: &Group<'_>,
    columns: &[Column],
    window: &Window,
    budget: &Budget,
) -> Result<Vec<Vec<Cell>>, String> {
    let inputs: Vec<ColumnInput> = columns
        .iter()
        .map(|c| match &c.source {
            ColumnSource::Call(call) => ColumnInput::Points(field_points(group, call_field(call))),
            _ => ColumnInput::Empty,
        })
        .collect();
    rows_from_inputs(columns, &inputs, window, budget)
}

/// Computes the rows of one output series from each column's input.
pub fn rows_from_inputs(
    columns: &[Column],
    inputs: &[ColumnInput],
    window: &Window,
    budget: &Budget,
) -> Result<Vec<Vec<Cell>>, String> {
    let first_point = inputs.iter().filter_map(ColumnInput::first_time).min();
    let starts = window.starts(first_point, budget)?;
    if starts.is_empty() {
        return Ok(Vec::new());
    }
    let computed: Vec<ColumnValues> = columns
        .iter()
        .zip(inputs)
        .map(|(c, input)| column_values(c, input, window, &starts))
        .collect();
    Ok(assemble(columns, window, &starts, &computed))
}

fn column_values(
    column: &Column,
    input: &ColumnInput,
    window: &Window,
    starts: &[i64],
) -> ColumnValues {
    let n = starts.len();
    let empty = || ColumnValues {
        values: vec![None; n],
        selected_times: vec![None; n],
        has_points: vec![false; n],
    };
    let ColumnSource::Call(call) = &column.source else {
        return empty();
    };
    let (values, selected_times, has_points) = match input {
        ColumnInput::Points(points) => aggregate_points(call, points, window, starts),
        ColumnInput::Windows(windows) => {
            let values: Vec<Option<Value>> =
                starts.iter().map(|s| windows.get(s).copied()).collect();
            let has_points = values.iter().map(Option::is_some).collect();
            (values, vec![None; n], has_points)
        }
        ColumnInput::Empty => return empty(),
    };
    finish_column(call, window, starts, values, selected_times, has_points)
}

/// Aggregates raw points per window: the values, the selected point times and whether
/// each window held a point.
fn aggregate_points(
    call: &super::ast::Call,
    points: &[(i64, Value)],
    window: &Window,
    starts: &[i64],
) -> (Vec<Option<Value>>, Vec<Option<i64>>, Vec<bool>) {
    let inner = window_call(call);
    let mut values = Vec::with_capacity(starts.len());
    let mut selected_times = Vec::with_capacity(starts.len());
    let mut has_points = Vec::with_capacity(starts.len());
    let mut cursor = 0;
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(i64::MAX);
        let end = if window.group_by_time.is_some() {
            end
        } else {
            i64::MAX
        };
        while cursor < points.len() && points[cursor].0 < start {
            cursor += 1;
        }
        let begin = cursor;
        while cursor < points.len() && points[cursor].0 < end {
            cursor += 1;
        }
        let window_points = &points[begin..cursor];
        let result: Option<Aggregated> =
            functions::aggregate(inner.function, window_points, inner.percentile);
        values.push(result.map(|r| r.value));
        selected_times.push(result.and_then(|r| r.time));
        has_points.push(!window_points.is_empty());
    }
    (values, selected_times, has_points)
}

/// Fills empty windows and applies an outer transform.
fn finish_column(
    call: &super::ast::Call,
    window: &Window,
    starts: &[i64],
    mut values: Vec<Option<Value>>,
    selected_times: Vec<Option<i64>>,
    has_points: Vec<bool>,
) -> ColumnValues {
    let inner = window_call(call);
    if window.group_by_time.is_some() {
        functions::fill(&mut values, starts, window.fill, is_count(inner));
    } else if is_count(inner) && values.iter().all(Option::is_none) {
        values = vec![Some(Value::Number(0.0)); starts.len()];
    }
    if is_windowed_transform(call) {
        values = transform_windows(call, window, starts, &values);
    }
    ColumnValues {
        values,
        selected_times,
        has_points,
    }
}

/// Applies the outer transform of `derivative(mean(x))` and similar to the window values;
/// the derivative's unit defaults to the `GROUP BY time()` interval, as in InfluxDB.
fn transform_windows(
    call: &super::ast::Call,
    window: &Window,
    starts: &[i64],
    values: &[Option<Value>],
) -> Vec<Option<Value>> {
    let interval = window
        .group_by_time
        .map_or(1_000_000_000, |(interval, _)| interval);
    let unit = call.unit.unwrap_or(interval);
    let points: Vec<(i64, Value)> = starts
        .iter()
        .zip(values)
        .filter_map(|(&t, v)| v.map(|v| (t, v)))
        .collect();
    let transformed = functions::transform(call.function, &points, unit);
    let mut out = vec![None; starts.len()];
    for (t, value) in transformed {
        if let Ok(index) = starts.binary_search(&t) {
            out[index] = Some(value);
        }
    }
    out
}

/// Builds the rows, dropping windows that have nothing to show: windows without points
/// under `fill(none)` or without `GROUP BY time()`, and windows where every transform
/// column is empty.
fn assemble(
    columns: &[Column],
    window: &Window,
    starts: &[i64],
    computed: &[ColumnValues],
) -> Vec<Vec<Cell>> {
    let single_selector =
        window.group_by_time.is_none() && columns.len() == 1 && is_selector_column(&columns[0]);
    let any_transform = columns
        .iter()
        .any(|c| matches!(&c.source, ColumnSource::Call(call) if is_windowed_transform(call)));
    let mut out = Vec::with_capacity(starts.len());
    for (i, &start) in starts.iter().enumerate() {
        let had_points = computed.iter().any(|c| c.has_points[i]);
        let drop_empty = window.fill == Fill::None || window.group_by_time.is_none();
        if drop_empty && !had_points {
            continue;
        }
        if any_transform && computed.iter().all(|c| c.values[i].is_none()) {
            continue;
        }
        let time = if single_selector {
            computed[0].selected_times[i].unwrap_or(start)
        } else {
            start
        };
        let mut row = vec![Cell::Time(time)];
        row.extend(
            computed
                .iter()
                .map(|c| c.values[i].map_or(Cell::Null, Cell::from)),
        );
        out.push(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::influxql::QueryLimits;

    fn window(group_by_time: Option<(i64, i64)>, tz: Option<chrono_tz::Tz>) -> Window {
        Window {
            range: TimeRange::ALL,
            now_ns: 0,
            group_by_time,
            time_zone: tz,
            fill: Fill::Null,
        }
    }

    const HOUR: i64 = 3_600_000_000_000;

    #[test]
    fn windows_align_to_epoch_and_offset() {
        let w = window(Some((HOUR, 0)), None);
        assert_eq!(w.start_of(HOUR + 5, HOUR, 0), HOUR);
        assert_eq!(w.start_of(HOUR - 1, HOUR, 0), 0);
        assert_eq!(w.start_of(-1, HOUR, 0), -HOUR);
        assert_eq!(
            w.start_of(HOUR + 5, HOUR, 15 * 60_000_000_000),
            15 * 60_000_000_000
        );
    }

    #[test]
    fn day_windows_follow_time_zone() {
        let day = 24 * HOUR;
        let w = window(Some((day, 0)), Some(chrono_tz::Asia::Shanghai));
        // 1970-01-02T03:00Z is 11:00 in Shanghai, whose day began at 1970-01-01T16:00Z.
        assert_eq!(w.start_of(day + 3 * HOUR, day, 0), 16 * HOUR);
    }

    #[test]
    fn starts_cover_range_inclusively() {
        let mut w = window(Some((10, 0)), None);
        w.range = TimeRange { min: 15, max: 40 };
        let budget = Budget::new(QueryLimits::default());
        assert_eq!(
            w.starts(Some(17), &budget).expect("starts"),
            vec![10, 20, 30, 40]
        );
        assert_eq!(w.count(15, 40, 10, 0), 4);
    }

    #[test]
    fn too_many_windows_rejected() {
        let mut w = window(Some((1, 0)), None);
        w.range = TimeRange {
            min: 0,
            max: 10_000_000,
        };
        let budget = Budget::new(QueryLimits {
            max_buckets: 1_000_000,
            ..QueryLimits::default()
        });
        let error = w.starts(Some(0), &budget).expect_err("too many windows");
        assert!(error.contains("needs 10000001"), "{error}");
        assert_eq!(budget.remaining_buckets(), 1_000_000);
    }

    #[test]
    fn zoned_windows_stop_at_budget() {
        let mut w = window(Some((HOUR, 0)), Some(chrono_tz::Asia::Shanghai));
        w.range = TimeRange {
            min: 0,
            max: 100 * HOUR,
        };
        let budget = Budget::new(QueryLimits {
            max_buckets: 10,
            ..QueryLimits::default()
        });
        let error = w.starts(Some(0), &budget).expect_err("over the budget");
        assert!(error.contains("needs more than 10"), "{error}");
    }
}
