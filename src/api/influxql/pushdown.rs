//! Aggregates computed by the store: a `SELECT` of `mean`, `min`, `max`, `first`, `last`,
//! `sum` or `count` with `GROUP BY time()` is sent to [`TimeSeriesStore::query`] with an
//! aggregation, so the embedded engine reads rollups where raw data has expired.
//!
//! The store aggregates per step of whole milliseconds aligned to the Unix epoch, one
//! series at a time. A statement is pushed down only when that matches what the
//! evaluator computes from raw points: an interval of whole milliseconds, no offset that
//! moves windows off the epoch grid, no `tz()`, and no condition on field values.
//!
//! Output series that merge several tag sets are pushed down only for `min`, `max` and
//! `count`. `first` and `last` need point times across series, and a sum of per-series
//! sums can round differently from the evaluator's sum in time order.
//!
//! [`TimeSeriesStore::query`]: crate::storage::TimeSeriesStore::query

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::model::Value;
use crate::storage::{Aggregate, Query, Selector};

use super::aggregate::{self, ColumnInput};
use super::ast::{Call, Expr, Function, SelectStatement};
use super::catalog::TagSet;
use super::condition::referenced_fields;
use super::response::Cell;
use super::select::{
    Column, ColumnSource, MeasurementPlan, Mode, call_field, group_key, window_call,
};

const NANOS_PER_MILLI: i64 = 1_000_000;

/// The store aggregation that computes a call's per-window function, if any.
fn store_aggregate(call: &Call) -> Option<Aggregate> {
    match window_call(call).function {
        Function::Mean => Some(Aggregate::Mean),
        Function::Min => Some(Aggregate::Min),
        Function::Max => Some(Aggregate::Max),
        Function::First => Some(Aggregate::First),
        Function::Last => Some(Aggregate::Last),
        Function::Sum => Some(Aggregate::Sum),
        Function::Count => Some(Aggregate::Count),
        _ => None,
    }
}

/// Returns the store aggregation of each column when the statement can be pushed down,
/// before tag sets are grouped.
///
/// NOTE: tests compare both paths on the embedded engine and the test store only. The
/// SQLite backend sums with SQL `SUM` and `AVG`, which are not checked to agree to the
/// last bit.
pub fn plan(
    select: &SelectStatement,
    mode: Mode,
    columns: &[Column],
    condition: Option<&Expr>,
    field_keys: &HashSet<String>,
) -> Option<Vec<Aggregate>> {
    if mode != Mode::Aggregate || select.time_zone.is_some() {
        return None;
    }
    let (interval, offset) = select.group_by.time?;
    if interval % NANOS_PER_MILLI != 0 || offset.rem_euclid(interval) != 0 {
        return None;
    }
    if let Some(expr) = condition {
        let mut fields = Vec::new();
        referenced_fields(expr, field_keys, &mut fields);
        if !fields.is_empty() {
            return None;
        }
    }
    columns
        .iter()
        .map(|column| match &column.source {
            ColumnSource::Call(call) => store_aggregate(call),
            _ => None,
        })
        .collect()
}

/// The measurement, tag sets and columns of a pushed-down statement.
pub struct Target<'a> {
    pub measurement: &'a str,
    /// Tag sets that the tag condition matches.
    pub tag_sets: &'a [TagSet],
    pub dimensions: &'a [String],
    pub columns: &'a [Column],
    /// The store aggregation of each column, from [`plan`].
    pub aggregates: &'a [Aggregate],
}

/// Per-window values of one store query: tag set to window start (ns) to value.
type StoreWindows = HashMap<TagSet, BTreeMap<i64, Value>>;

/// Rows of output series, each with its `GROUP BY` tag values.
type GroupedRows = Vec<(Vec<String>, Vec<Vec<Cell>>)>;

/// Computes the rows of each output series from store aggregates, or `None` when an
/// output series merges several tag sets under an aggregate that cannot be combined
/// exactly, so the caller aggregates raw points instead.
pub fn rows(
    plan: &MeasurementPlan<'_>,
    target: &Target<'_>,
) -> Result<Option<GroupedRows>, String> {
    let mut groups: BTreeMap<Vec<String>, Vec<&TagSet>> = BTreeMap::new();
    for tags in target.tag_sets {
        groups
            .entry(group_key(tags, target.dimensions))
            .or_default()
            .push(tags);
    }
    let merges_exactly = target
        .aggregates
        .iter()
        .all(|a| matches!(a, Aggregate::Min | Aggregate::Max | Aggregate::Count));
    if !merges_exactly && groups.values().any(|members| members.len() > 1) {
        return Ok(None);
    }

    let (interval, _) = plan.window().group_by_time.unwrap_or_default();
    let step = Duration::from_millis(u64::try_from(interval / NANOS_PER_MILLI).unwrap_or(1));
    let wanted: HashSet<&TagSet> = target.tag_sets.iter().collect();
    let mut fetched: HashMap<(String, &str), StoreWindows> = HashMap::new();
    for (column, &aggregation) in target.columns.iter().zip(target.aggregates) {
        let ColumnSource::Call(call) = &column.source else {
            continue;
        };
        let field = call_field(call).clone();
        let key = (field.clone(), aggregation.name());
        if fetched.contains_key(&key) {
            continue;
        }
        let query = Query {
            selector: Selector {
                measurement: Some(target.measurement.to_owned()),
                tags: Vec::new(),
                field: Some(field.clone()),
            },
            from: plan.store_from(),
            to: plan.store_to(),
            aggregation: Some((step, aggregation)),
            limit: None,
        };
        let data = plan.context.store.query(&query).map_err(|e| {
            format!(
                "reading {}(\"{field}\") of {} failed: {e}",
                aggregation.name(),
                target.measurement
            )
        })?;
        let mut windows = StoreWindows::new();
        for series in data {
            if !wanted.contains(&series.series.tags) {
                continue;
            }
            let values = series.points.into_iter().map(|(ts, value)| {
                let start = ts.as_millis().saturating_mul(NANOS_PER_MILLI);
                (start, as_evaluated(aggregation, value))
            });
            windows.insert(series.series.tags, values.collect());
        }
        fetched.insert(key, windows);
    }

    let window = plan.window();
    let mut out = Vec::with_capacity(groups.len());
    for (key, members) in groups {
        let inputs: Vec<ColumnInput> = target
            .columns
            .iter()
            .zip(target.aggregates)
            .map(|(column, &aggregation)| {
                let ColumnSource::Call(call) = &column.source else {
                    return ColumnInput::Empty;
                };
                let windows = &fetched[&(call_field(call).clone(), aggregation.name())];
                ColumnInput::Windows(merge_members(aggregation, windows, &members))
            })
            .collect();
        let rows =
            aggregate::rows_from_inputs(target.columns, &inputs, &window, &plan.context.budget)?;
        out.push((key, rows));
    }
    Ok(Some(out))
}

/// Converts a store value to what the evaluator returns: `min` and `max` read booleans
/// as numbers, while the store keeps the series' kind.
fn as_evaluated(aggregation: Aggregate, value: Value) -> Value {
    match aggregation {
        Aggregate::Min | Aggregate::Max => Value::Number(value.as_f64()),
        _ => value,
    }
}

/// Combines the windows of the tag sets of one output series. Several tag sets are only
/// combined under `min`, `max` and `count`, which [`rows`] checks.
fn merge_members(
    aggregation: Aggregate,
    windows: &StoreWindows,
    members: &[&TagSet],
) -> BTreeMap<i64, Value> {
    let mut merged: BTreeMap<i64, Value> = BTreeMap::new();
    for tags in members {
        let Some(member) = windows.get(*tags) else {
            continue;
        };
        for (&start, &value) in member {
            merged
                .entry(start)
                .and_modify(|current| *current = combine(aggregation, *current, value))
                .or_insert(value);
        }
    }
    merged
}

fn combine(aggregation: Aggregate, current: Value, other: Value) -> Value {
    let (a, b) = (current.as_f64(), other.as_f64());
    match aggregation {
        Aggregate::Min => Value::Number(a.min(b)),
        Aggregate::Max => Value::Number(a.max(b)),
        Aggregate::Count => Value::Number(a + b),
        // Unreachable for several members, which `rows` rejects; a single member is
        // never combined.
        _ => current,
    }
}
