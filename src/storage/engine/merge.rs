//! Merging points from several sources and aggregating them by step.

use crate::model::{Timestamp, Value, ValueKind};
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
    let mut out = SeriesBuf { ts: Vec::with_capacity(all.len()), values: Vec::with_capacity(all.len()) };
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

/// Aggregates sorted points into one value per step that has data.
pub fn aggregate(buf: &SeriesBuf, step_ms: i64, aggregate: Aggregate, kind: ValueKind) -> Vec<(Timestamp, Value)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.ts.len() {
        let start = step_start(buf.ts[i], step_ms);
        let mut j = i;
        while j < buf.ts.len() && buf.ts[j] < start + step_ms {
            j += 1;
        }
        out.push((Timestamp(start), reduce(&buf.values[i..j], aggregate, kind)));
        i = j;
    }
    out
}

fn reduce(values: &[f64], aggregate: Aggregate, kind: ValueKind) -> Value {
    let keep_kind = |v: f64| Value::from_stored(v, kind);
    match aggregate {
        Aggregate::Mean => Value::Number(values.iter().sum::<f64>() / values.len() as f64),
        Aggregate::Sum => Value::Number(values.iter().sum()),
        Aggregate::Count => Value::Number(values.len() as f64),
        Aggregate::Min => keep_kind(values.iter().copied().fold(f64::INFINITY, f64::min)),
        Aggregate::Max => keep_kind(values.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        Aggregate::First => keep_kind(values[0]),
        Aggregate::Last => keep_kind(values[values.len() - 1]),
    }
}
