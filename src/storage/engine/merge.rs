//! Merging points from several sources and aggregating them by step.

use crate::model::{Value, ValueKind};
use crate::storage::Aggregate;

use super::memtable::SeriesBuf;

/// Merges sources given oldest first into one sorted buffer. Where several points share a
/// timestamp, the last one (newest source, latest arrival) wins.
pub fn merge(sources: Vec<SeriesBuf>) -> SeriesBuf {
    let total: usize = sources.iter().map(|s| s.ts.len()).sum();
    if sources.len() == 1 && is_strictly_sorted(&sources[0].ts) {
        return sources.into_iter().next().unwrap_or_default();
    }
    let mut all: Vec<(i64, f64)> = Vec::with_capacity(total);
    for source in &sources {
        all.extend(source.ts.iter().copied().zip(source.values.iter().copied()));
    }
    // A stable sort keeps equal timestamps in source order, so the last of a run is newest.
    all.sort_by_key(|p| p.0);
    let mut out = SeriesBuf {
        ts: Vec::with_capacity(all.len()),
        values: Vec::with_capacity(all.len()),
    };
    for (ts, value) in all {
        if out.ts.last() == Some(&ts) {
            *out.values.last_mut().expect("values parallel to ts") = value;
        } else {
            out.ts.push(ts);
            out.values.push(value);
        }
    }
    out
}

fn is_strictly_sorted(ts: &[i64]) -> bool {
    ts.windows(2).all(|w| w[0] < w[1])
}

/// Start of the step that contains `ts`, with steps aligned to the Unix epoch. Steps that
/// would start before `i64::MIN` start at `i64::MIN`.
pub fn step_start(ts: i64, step_ms: i64) -> i64 {
    ts.checked_sub(ts.rem_euclid(step_ms)).unwrap_or(i64::MIN)
}

/// Count, sum, minimum, maximum, first and last value of the points in one step or
/// rollup bucket. Two summaries of adjacent time ranges combine exactly, except that a
/// sum of partial sums may round differently from a sum over every point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub count: f64,
    /// For bool series, the number of `true` values.
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub last: f64,
}

impl Summary {
    fn of(value: f64) -> Summary {
        Summary {
            count: 1.0,
            sum: value,
            min: value,
            max: value,
            first: value,
            last: value,
        }
    }

    fn push(&mut self, value: f64) {
        self.count += 1.0;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.last = value;
    }

    /// Adds the summary of a time range that follows this one.
    pub fn append(&mut self, later: &Summary) {
        self.count += later.count;
        self.sum += later.sum;
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.last = later.last;
    }

    /// Computes the value of `aggregate`, keeping the series' kind for `min`, `max`, `first` and `last`.
    pub fn value(&self, aggregate: Aggregate, kind: ValueKind) -> Value {
        let keep_kind = |v: f64| Value::from_stored(v, kind);
        match aggregate {
            Aggregate::Mean => Value::Number(self.sum / self.count),
            Aggregate::Sum => Value::Number(self.sum),
            Aggregate::Count => Value::Number(self.count),
            Aggregate::Min => keep_kind(self.min),
            Aggregate::Max => keep_kind(self.max),
            Aggregate::First => keep_kind(self.first),
            Aggregate::Last => keep_kind(self.last),
        }
    }
}

/// Summarizes sorted points into one summary per step that has data, keyed by the
/// step start.
pub fn summarize(buf: &SeriesBuf, step_ms: i64) -> Vec<(i64, Summary)> {
    let mut out: Vec<(i64, Summary)> = Vec::new();
    for (&ts, &value) in buf.ts.iter().zip(&buf.values) {
        let start = step_start(ts, step_ms);
        match out.last_mut() {
            Some((last_start, summary)) if *last_start == start => summary.push(value),
            _ => out.push((start, Summary::of(value))),
        }
    }
    out
}

/// Combines summaries of finer buckets, sorted by time, into one summary per step.
/// Each bucket must lie inside one step, which holds when `step_ms` is a multiple of
/// the bucket width.
pub fn combine(
    rows: impl IntoIterator<Item = (i64, Summary)>,
    step_ms: i64,
) -> Vec<(i64, Summary)> {
    let mut out: Vec<(i64, Summary)> = Vec::new();
    for (ts, row) in rows {
        let start = step_start(ts, step_ms);
        match out.last_mut() {
            Some((last_start, summary)) if *last_start == start => summary.append(&row),
            _ => out.push((start, row)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(points: &[(i64, f64)]) -> SeriesBuf {
        SeriesBuf {
            ts: points.iter().map(|p| p.0).collect(),
            values: points.iter().map(|p| p.1).collect(),
        }
    }

    #[test]
    fn combined_buckets_equal_direct_summary() {
        let points: Vec<(i64, f64)> = (0..500)
            .map(|i| (i * 7 - 1_000, f64::from((i * 37 % 23) as i32) * 0.25 - 2.0))
            .collect();
        let direct = summarize(&buf(&points), 60);
        let combined = combine(summarize(&buf(&points), 20), 60);
        assert_eq!(combined, direct);
    }

    #[test]
    fn bool_sum_counts_true_values() {
        let summary = summarize(&buf(&[(0, 1.0), (1, 0.0), (2, 1.0), (3, 1.0)]), 10);
        assert_eq!(summary.len(), 1);
        assert_eq!(
            summary[0].1.value(Aggregate::Sum, ValueKind::Bool),
            Value::Number(3.0)
        );
        assert_eq!(
            summary[0].1.value(Aggregate::Mean, ValueKind::Bool),
            Value::Number(0.75)
        );
        assert_eq!(
            summary[0].1.value(Aggregate::First, ValueKind::Bool),
            Value::Bool(true)
        );
        assert_eq!(
            summary[0].1.value(Aggregate::Min, ValueKind::Bool),
            Value::Bool(false)
        );
    }
}
