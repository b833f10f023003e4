//! InfluxQL functions over points: aggregates and selectors per window, transforms over a
//! sequence, and the fill of empty windows.
//!
//! Booleans are read as 1 and 0 by numeric functions. InfluxDB 1.x rejects `mean()` and
//! similar functions over boolean fields instead, so dashboards that need both backends
//! must not rely on it.

use crate::model::Value;

use super::ast::{Fill, Function};

/// Points of one column, as (nanoseconds, value), in time order.
pub type Points = [(i64, Value)];

/// The result of an aggregate or selector over one window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aggregated {
    /// The time of the selected point, for selectors.
    pub time: Option<i64>,
    pub value: Value,
}

/// Computes `function` over the points of one window; `None` when the window is empty or
/// the function has no value for it.
pub fn aggregate(
    function: Function,
    points: &Points,
    percentile: Option<f64>,
) -> Option<Aggregated> {
    if points.is_empty() {
        return None;
    }
    let numbers = || points.iter().map(|(_, v)| v.as_f64());
    let number = |value: f64| {
        Some(Aggregated {
            time: None,
            value: Value::Number(value),
        })
    };
    match function {
        Function::Count => number(points.len() as f64),
        Function::Sum => number(numbers().sum()),
        Function::Mean => number(numbers().sum::<f64>() / points.len() as f64),
        Function::Median => number(median(numbers().collect())),
        Function::Spread => {
            let (min, max) = numbers().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            number(max - min)
        }
        Function::First => select_point(points[0]),
        Function::Last => select_point(points[points.len() - 1]),
        Function::Min => select_extreme(points, |candidate, best| candidate < best),
        Function::Max => select_extreme(points, |candidate, best| candidate > best),
        Function::Percentile => percentile_point(points, percentile.unwrap_or(50.0)),
        Function::Difference | Function::Derivative | Function::NonNegativeDerivative => None,
    }
}

fn select_point((time, value): (i64, Value)) -> Option<Aggregated> {
    Some(Aggregated {
        time: Some(time),
        value,
    })
}

/// Picks the point whose value wins `better`; ties keep the earliest point, as InfluxDB does.
fn select_extreme(points: &Points, better: impl Fn(f64, f64) -> bool) -> Option<Aggregated> {
    let mut best = points[0];
    for &point in &points[1..] {
        if better(point.1.as_f64(), best.1.as_f64()) {
            best = point;
        }
    }
    let (time, value) = best;
    Some(Aggregated {
        time: Some(time),
        value: Value::Number(value.as_f64()),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Nearest-rank percentile as in InfluxDB 1.x: the value at rank `floor(n * p / 100 + 0.5)`
/// of the sorted values, or nothing when that rank falls outside them.
fn percentile_point(points: &Points, percentile: f64) -> Option<Aggregated> {
    let mut sorted: Vec<(i64, Value)> = points.to_vec();
    sorted.sort_by(|a, b| a.1.as_f64().total_cmp(&b.1.as_f64()).then(a.0.cmp(&b.0)));
    let rank = (sorted.len() as f64 * percentile / 100.0 + 0.5).floor() as i64 - 1;
    let index = usize::try_from(rank).ok().filter(|&i| i < sorted.len())?;
    let (time, value) = sorted[index];
    Some(Aggregated {
        time: Some(time),
        value: Value::Number(value.as_f64()),
    })
}

/// Applies a transform to a time-ordered sequence. Each output point carries the time of the
/// later of the two input points it was computed from, so the first point yields nothing.
/// `unit_ns` is the derivative's unit.
pub fn transform(function: Function, points: &Points, unit_ns: i64) -> Vec<(i64, Value)> {
    let mut out = Vec::with_capacity(points.len().saturating_sub(1));
    for pair in points.windows(2) {
        let ((t0, v0), (t1, v1)) = (pair[0], pair[1]);
        let delta = v1.as_f64() - v0.as_f64();
        let value = match function {
            Function::Difference => delta,
            Function::Derivative | Function::NonNegativeDerivative => {
                // Points at the same time have no defined rate; InfluxDB skips them too.
                if t1 == t0 {
                    continue;
                }
                delta / ((t1 - t0) as f64 / unit_ns as f64)
            }
            _ => continue,
        };
        if function == Function::NonNegativeDerivative && value < 0.0 {
            continue;
        }
        out.push((t1, Value::Number(value)));
    }
    out
}

/// Fills the empty windows of one column. `times` are the window starts, one per value.
/// `count()` reports 0 for an empty window, which the fill option replaces.
pub fn fill(values: &mut [Option<Value>], times: &[i64], fill: Fill, is_count: bool) {
    match fill {
        Fill::Null | Fill::None => {
            if is_count {
                values
                    .iter_mut()
                    .filter(|v| v.is_none())
                    .for_each(|v| *v = Some(Value::Number(0.0)));
            }
        }
        Fill::Number(n) => {
            values
                .iter_mut()
                .filter(|v| v.is_none())
                .for_each(|v| *v = Some(Value::Number(n)));
        }
        Fill::Previous => {
            let mut previous = None;
            for value in values.iter_mut() {
                match value {
                    Some(v) => previous = Some(*v),
                    None => *value = previous,
                }
            }
        }
        Fill::Linear => fill_linear(values, times),
    }
}

/// Interpolates each gap between two known values; gaps at either end stay empty.
fn fill_linear(values: &mut [Option<Value>], times: &[i64]) {
    let mut previous: Option<usize> = None;
    for index in 0..values.len() {
        let Some(current) = values[index] else {
            continue;
        };
        if let Some(start) = previous.filter(|&start| index > start + 1) {
            let (t0, v0) = (
                times[start] as f64,
                values[start].map_or(0.0, Value::as_f64),
            );
            let (t1, v1) = (times[index] as f64, current.as_f64());
            for gap in start + 1..index {
                let ratio = (times[gap] as f64 - t0) / (t1 - t0);
                values[gap] = Some(Value::Number(v0 + (v1 - v0) * ratio));
            }
        }
        previous = Some(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[(i64, f64)]) -> Vec<(i64, Value)> {
        values.iter().map(|&(t, v)| (t, Value::Number(v))).collect()
    }

    fn number(aggregated: Option<Aggregated>) -> f64 {
        aggregated.expect("a value").value.as_f64()
    }

    #[test]
    fn aggregates_over_window() {
        let p = points(&[(1, 4.0), (2, 1.0), (3, 3.0), (4, 2.0)]);
        assert_eq!(number(aggregate(Function::Mean, &p, None)), 2.5);
        assert_eq!(number(aggregate(Function::Median, &p, None)), 2.5);
        assert_eq!(number(aggregate(Function::Sum, &p, None)), 10.0);
        assert_eq!(number(aggregate(Function::Count, &p, None)), 4.0);
        assert_eq!(number(aggregate(Function::Spread, &p, None)), 3.0);
    }

    #[test]
    fn selectors_keep_point_time() {
        let p = points(&[(1, 4.0), (2, 1.0), (3, 4.0), (4, 1.0)]);
        let max = aggregate(Function::Max, &p, None).expect("max");
        assert_eq!((max.time, max.value), (Some(1), Value::Number(4.0)));
        let min = aggregate(Function::Min, &p, None).expect("min");
        assert_eq!(min.time, Some(2));
        assert_eq!(
            aggregate(Function::Last, &p, None).expect("last").time,
            Some(4)
        );
    }

    #[test]
    fn percentile_nearest_rank() {
        let p = points(&[(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0), (5, 50.0)]);
        assert_eq!(
            number(aggregate(Function::Percentile, &p, Some(50.0))),
            30.0
        );
        assert_eq!(
            number(aggregate(Function::Percentile, &p, Some(90.0))),
            50.0
        );
        assert_eq!(
            number(aggregate(Function::Percentile, &p, Some(100.0))),
            50.0
        );
        assert_eq!(aggregate(Function::Percentile, &p, Some(5.0)), None);
    }

    #[test]
    fn empty_window_has_no_value() {
        assert_eq!(aggregate(Function::Mean, &[], None), None);
    }

    #[test]
    fn median_of_odd_count() {
        let p = points(&[(1, 5.0), (2, 1.0), (3, 3.0)]);
        assert_eq!(number(aggregate(Function::Median, &p, None)), 3.0);
    }

    #[test]
    fn derivative_per_unit() {
        let p = points(&[(0, 0.0), (2_000_000_000, 10.0), (4_000_000_000, 4.0)]);
        let rate = transform(Function::Derivative, &p, 1_000_000_000);
        assert_eq!(rate, points(&[(2_000_000_000, 5.0), (4_000_000_000, -3.0)]));
        let non_negative = transform(Function::NonNegativeDerivative, &p, 1_000_000_000);
        assert_eq!(non_negative, points(&[(2_000_000_000, 5.0)]));
        let difference = transform(Function::Difference, &p, 1);
        assert_eq!(
            difference,
            points(&[(2_000_000_000, 10.0), (4_000_000_000, -6.0)])
        );
    }

    #[test]
    fn fill_modes() {
        let times = [0, 10, 20, 30, 40];
        let base = [
            None,
            Some(Value::Number(1.0)),
            None,
            Some(Value::Number(3.0)),
            None,
        ];

        let mut linear = base;
        fill(&mut linear, &times, Fill::Linear, false);
        assert_eq!(linear[0], None);
        assert_eq!(linear[2], Some(Value::Number(2.0)));
        assert_eq!(linear[4], None);

        let mut previous = base;
        fill(&mut previous, &times, Fill::Previous, false);
        assert_eq!(
            previous,
            [
                None,
                Some(Value::Number(1.0)),
                Some(Value::Number(1.0)),
                Some(Value::Number(3.0)),
                Some(Value::Number(3.0))
            ]
        );

        let mut number = base;
        fill(&mut number, &times, Fill::Number(-1.0), false);
        assert_eq!(number[0], Some(Value::Number(-1.0)));

        let mut count = base;
        fill(&mut count, &times, Fill::Null, true);
        assert_eq!(count[0], Some(Value::Number(0.0)));
    }
}
