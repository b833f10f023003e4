//! `SELECT` evaluation: columns are planned per measurement, points are read from the store
//! one field at a time, joined into rows per tag set, filtered by the field condition, and
//! grouped into output series.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::model::{Timestamp, Value};
use crate::storage::{Query, Selector};

use super::EvalContext;
use super::aggregate::{self, Window};
use super::ast::{
    Call, CallInput, Expr, FieldExpr, Function, RefKind, SelectStatement, TagDimension, VarRef,
};
use super::catalog::{Catalog, TagSet, ns_to_ms_ceil, ns_to_ms_floor};
use super::condition::{self, RowContext, TimeRange, referenced_fields, split_time};
use super::functions;
use super::pushdown;
use super::response::{Cell, Series, SeriesOutput};

/// The input of one output column.
#[derive(Clone, Debug)]
pub enum ColumnSource {
    Field(String),
    Tag(String),
    Call(Call),
}

/// One output column after `*` is expanded.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub source: ColumnSource,
}

/// The evaluation strategy for a statement's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Raw fields and tags, one row per stored point.
    Raw,
    /// Transforms such as `derivative(x)` over raw points.
    RawTransform,
    /// Aggregates and selectors per window, optionally under a transform.
    Aggregate,
}

/// The rows of one tag set: time in nanoseconds to one value per read field.
pub type Rows = BTreeMap<i64, Vec<Option<Value>>>;

/// One output series before paging: its group key and the tag sets it merges.
pub struct Group<'a> {
    pub members: Vec<(&'a TagSet, &'a Rows)>,
    /// Index of each field in the row vectors.
    pub field_index: &'a BTreeMap<String, usize>,
}

pub fn evaluate(
    context: &EvalContext<'_>,
    select: &SelectStatement,
) -> Result<SeriesOutput, String> {
    let mode = classify(select)?;
    let catalog = Catalog::load(context)?;
    let measurements = catalog.resolve(context, &select.sources)?;
    let (range, condition) = split_time(select.condition.as_ref())?;
    let mut out = Vec::new();
    if !range.is_empty() {
        for measurement in &measurements {
            let plan = MeasurementPlan {
                context,
                catalog: &catalog,
                select,
                mode,
                range,
            };
            out.extend(plan.run(measurement, condition.as_ref())?);
        }
    }
    let out = out
        .into_iter()
        .skip(select.series_offset)
        .take(select.series_limit.unwrap_or(usize::MAX))
        .collect();
    Ok((out, select.time_zone))
}

/// Checks that columns do not mix raw values and aggregates, and that transforms fit the
/// grouping, with InfluxDB 1.x's messages.
fn classify(select: &SelectStatement) -> Result<Mode, String> {
    let calls: Vec<&Call> = select
        .fields
        .iter()
        .filter_map(|f| match &f.expr {
            FieldExpr::Call(call) => Some(call),
            _ => None,
        })
        .collect();
    if calls.is_empty() {
        if select.group_by.time.is_some() {
            return Err("GROUP BY requires at least one aggregate function".into());
        }
        return Ok(Mode::Raw);
    }
    if calls.len() != select.fields.len() {
        return Err("mixing aggregate and non-aggregate queries is not supported".into());
    }
    let raw_transform =
        |c: &&Call| c.function.is_transform() && matches!(c.input, CallInput::Field(_));
    if calls.iter().all(raw_transform) {
        if select.group_by.time.is_some() {
            let name = calls[0].function.name();
            return Err(format!(
                "aggregate function required inside the call to {name}"
            ));
        }
        return Ok(Mode::RawTransform);
    }
    if calls.iter().any(raw_transform) {
        return Err("mixing aggregate and non-aggregate queries is not supported".into());
    }
    let nested = calls.iter().find(|c| c.function.is_transform());
    if let Some(call) = nested.filter(|_| select.group_by.time.is_none()) {
        return Err(format!(
            "{} aggregate requires a GROUP BY interval",
            call.function.name()
        ));
    }
    Ok(Mode::Aggregate)
}

pub struct MeasurementPlan<'a> {
    pub context: &'a EvalContext<'a>,
    catalog: &'a Catalog,
    select: &'a SelectStatement,
    mode: Mode,
    range: TimeRange,
}

impl MeasurementPlan<'_> {
    fn run(&self, measurement: &str, condition: Option<&Expr>) -> Result<Vec<Series>, String> {
        let field_keys = self.catalog.field_keys(measurement);
        let tag_keys = self.catalog.tag_keys(measurement);
        let dimensions = group_dimensions(&self.select.group_by.tags, &tag_keys);
        let columns = plan_columns(self.select, &field_keys, &tag_keys, &dimensions)?;

        let selected = selected_fields(&columns);
        if !selected.iter().any(|f| field_keys.contains(f)) {
            return Ok(Vec::new());
        }
        let mut read_fields = selected;
        if let Some(expr) = condition {
            referenced_fields(expr, &field_keys, &mut read_fields);
        }
        let field_index: BTreeMap<String, usize> = read_fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), i))
            .collect();

        let tag_sets = self.catalog.matching_tag_sets(measurement, condition)?;
        self.context.budget.charge_series(tag_sets.len() as u64)?;
        self.check_buckets(&tag_sets, &dimensions)?;

        let pushed = pushdown::plan(self.select, self.mode, &columns, condition, &field_keys);
        let pushed_rows = match pushed {
            Some(aggregates) => {
                let target = pushdown::Target {
                    measurement,
                    tag_sets: &tag_sets,
                    dimensions: &dimensions,
                    columns: &columns,
                    aggregates: &aggregates,
                };
                pushdown::rows(self, &target)?
            }
            None => None,
        };
        let grouped_rows = match pushed_rows {
            Some(grouped_rows) => grouped_rows,
            None => {
                let mut rows = self.read_rows(measurement, &tag_sets, &field_index)?;
                if let Some(expr) = condition {
                    filter_rows(&mut rows, expr, &field_keys, &field_index);
                }
                let mut grouped_rows = Vec::new();
                for (key, members) in group_tag_sets(&rows, &dimensions) {
                    let group = Group {
                        members,
                        field_index: &field_index,
                    };
                    grouped_rows.push((key, self.series_rows(&group, &columns)?));
                }
                grouped_rows
            }
        };

        let mut out = Vec::new();
        for (key, values) in grouped_rows {
            let values = self.page(values);
            if values.is_empty() {
                continue;
            }
            let mut names: Vec<&str> = vec!["time"];
            names.extend(columns.iter().map(|c| c.name.as_str()));
            let mut series = Series::new(Some(measurement), &names, values);
            if !self.select.group_by.tags.is_empty() {
                series.tags = Some(dimensions.iter().cloned().zip(key).collect());
            }
            out.push(series);
        }
        Ok(out)
    }

    /// Checks before any point is read that the `GROUP BY time()` buckets of a bounded
    /// range, times the output series that the matching tag sets can form, fit the budget.
    fn check_buckets(&self, tag_sets: &[TagSet], dimensions: &[String]) -> Result<(), String> {
        let Some((interval, offset)) = self.select.group_by.time else {
            return Ok(());
        };
        // With tz() window starts are not evenly spaced, and without a lower time bound
        // windows start at the first point, so those are checked as windows are built.
        if self.mode != Mode::Aggregate || self.select.time_zone.is_some() || !self.range.has_min()
        {
            return Ok(());
        }
        let max = if self.range.has_max() {
            self.range.max
        } else {
            self.context.now_ns
        };
        let per_series = self.window().count(self.range.min, max, interval, offset);
        let groups: HashSet<Vec<String>> = tag_sets
            .iter()
            .map(|tags| group_key(tags, dimensions))
            .collect();
        self.context
            .budget
            .check_buckets(per_series, groups.len() as u64)
    }

    pub fn window(&self) -> Window {
        Window {
            range: self.range,
            now_ns: self.context.now_ns,
            group_by_time: self.select.group_by.time,
            time_zone: self.select.time_zone,
            fill: self.select.fill,
        }
    }

    /// Reads every needed field of the measurement in the time range, one store query per
    /// field, and joins the values into rows per tag set.
    fn read_rows(
        &self,
        measurement: &str,
        tag_sets: &[TagSet],
        field_index: &BTreeMap<String, usize>,
    ) -> Result<BTreeMap<TagSet, Rows>, String> {
        let wanted: HashSet<&TagSet> = tag_sets.iter().collect();
        let mut rows: BTreeMap<TagSet, Rows> = BTreeMap::new();
        for (field, &index) in field_index {
            let query = Query {
                selector: Selector {
                    measurement: Some(measurement.to_owned()),
                    tags: Vec::new(),
                    field: Some(field.clone()),
                },
                from: self.store_from(),
                to: self.store_to(),
                aggregation: None,
                // One point over the budget is enough to report the limit.
                limit: Some(
                    usize::try_from(self.context.budget.remaining_points())
                        .unwrap_or(usize::MAX)
                        .saturating_add(1),
                ),
            };
            let data = self
                .context
                .store
                .query(&query)
                .map_err(|e| format!("reading {measurement}.{field} failed: {e}"))?;
            for series in data {
                if !wanted.contains(&series.series.tags) {
                    continue;
                }
                self.context
                    .budget
                    .charge_points(series.points.len() as u64)?;
                let tag_rows = rows.entry(series.series.tags.clone()).or_default();
                for (ts, value) in series.points {
                    let ns = ts.as_millis().saturating_mul(1_000_000);
                    if ns < self.range.min || ns > self.range.max {
                        continue;
                    }
                    let row = tag_rows
                        .entry(ns)
                        .or_insert_with(|| vec![None; field_index.len()]);
                    row[index] = Some(value);
                }
            }
        }
        Ok(rows)
    }

    fn series_rows(&self, group: &Group<'_>, columns: &[Column]) -> Result<Vec<Vec<Cell>>, String> {
        match self.mode {
            Mode::Raw => Ok(raw_rows(group, columns)),
            Mode::RawTransform => Ok(raw_transform_rows(group, columns)),
            Mode::Aggregate => {
                aggregate::rows(group, columns, &self.window(), &self.context.budget)
            }
        }
    }

    /// Inclusive start of the store query for the time range, in milliseconds.
    pub fn store_from(&self) -> Timestamp {
        Timestamp(ns_to_ms_ceil(self.range.min))
    }

    /// Exclusive end of the store query for the time range, in milliseconds.
    pub fn store_to(&self) -> Timestamp {
        Timestamp(ns_to_ms_floor(self.range.max).saturating_add(1))
    }

    fn page(&self, mut values: Vec<Vec<Cell>>) -> Vec<Vec<Cell>> {
        if self.select.descending {
            values.reverse();
        }
        let limit = self.select.limit.unwrap_or(usize::MAX);
        values
            .into_iter()
            .skip(self.select.offset)
            .take(limit)
            .collect()
    }
}

/// Resolves `GROUP BY` dimensions to the sorted tag keys that split series.
fn group_dimensions(dimensions: &[TagDimension], tag_keys: &BTreeSet<String>) -> Vec<String> {
    let mut keys = BTreeSet::new();
    for dimension in dimensions {
        match dimension {
            TagDimension::Name(name) => {
                keys.insert(name.clone());
            }
            TagDimension::Wildcard => keys.extend(tag_keys.iter().cloned()),
            TagDimension::Regex(re) => {
                keys.extend(tag_keys.iter().filter(|k| re.0.is_match(k)).cloned());
            }
        }
    }
    keys.into_iter().collect()
}

fn plan_columns(
    select: &SelectStatement,
    field_keys: &HashSet<String>,
    tag_keys: &BTreeSet<String>,
    dimensions: &[String],
) -> Result<Vec<Column>, String> {
    let mut columns = Vec::new();
    for field in &select.fields {
        match &field.expr {
            FieldExpr::Wildcard => {
                let mut names: BTreeMap<&str, ColumnSource> = BTreeMap::new();
                for f in field_keys {
                    names.insert(f, ColumnSource::Field(f.clone()));
                }
                for t in tag_keys.iter().filter(|t| !dimensions.contains(t)) {
                    names
                        .entry(t)
                        .or_insert_with(|| ColumnSource::Tag(t.clone()));
                }
                columns.extend(names.into_iter().map(|(name, source)| Column {
                    name: name.to_owned(),
                    source,
                }));
            }
            FieldExpr::Ref(var) => {
                let source = resolve_ref(var, field_keys, tag_keys);
                columns.push(Column {
                    name: field.alias.clone().unwrap_or_else(|| var.name.clone()),
                    source,
                });
            }
            FieldExpr::Call(call) => {
                let name = field
                    .alias
                    .clone()
                    .unwrap_or_else(|| call.function.name().to_owned());
                columns.push(Column {
                    name,
                    source: ColumnSource::Call(call.clone()),
                });
            }
        }
    }
    dedupe_names(&mut columns);
    Ok(columns)
}

fn resolve_ref(
    var: &VarRef,
    field_keys: &HashSet<String>,
    tag_keys: &BTreeSet<String>,
) -> ColumnSource {
    let is_tag = match var.kind {
        Some(RefKind::Tag) => true,
        Some(RefKind::Field) => false,
        None => !field_keys.contains(&var.name) && tag_keys.contains(&var.name),
    };
    if is_tag {
        ColumnSource::Tag(var.name.clone())
    } else {
        ColumnSource::Field(var.name.clone())
    }
}

/// Renames repeated column names to `name_1`, `name_2`, as InfluxDB does.
fn dedupe_names(columns: &mut [Column]) {
    let mut seen: HashSet<String> = ["time".to_owned()].into();
    for column in columns.iter_mut() {
        if seen.insert(column.name.clone()) {
            continue;
        }
        let mut n = 1;
        while !seen.insert(format!("{}_{n}", column.name)) {
            n += 1;
        }
        column.name = format!("{}_{n}", column.name);
    }
}

/// Lists the field names that columns read, in column order.
fn selected_fields(columns: &[Column]) -> Vec<String> {
    let mut fields = Vec::new();
    for column in columns {
        let name = match &column.source {
            ColumnSource::Field(name) => name,
            ColumnSource::Tag(_) => continue,
            ColumnSource::Call(call) => call_field(call),
        };
        if !fields.contains(name) {
            fields.push(name.clone());
        }
    }
    fields
}

/// Returns the field a call reads, through any nesting.
pub fn call_field(call: &Call) -> &String {
    match &call.input {
        CallInput::Field(var) => &var.name,
        CallInput::Call(inner) => call_field(inner),
    }
}

fn filter_rows(
    rows: &mut BTreeMap<TagSet, Rows>,
    expr: &Expr,
    field_keys: &HashSet<String>,
    field_index: &BTreeMap<String, usize>,
) {
    for (tags, tag_rows) in rows.iter_mut() {
        tag_rows.retain(|_, values| {
            let lookup = |name: &str| field_index.get(name).and_then(|&i| values[i]);
            let context = RowContext {
                tags,
                field_keys,
                fields: Some(&lookup),
            };
            condition::evaluate(expr, &context)
        });
    }
}

fn group_tag_sets<'a>(
    rows: &'a BTreeMap<TagSet, Rows>,
    dimensions: &[String],
) -> BTreeMap<Vec<String>, Vec<(&'a TagSet, &'a Rows)>> {
    let mut groups: BTreeMap<Vec<String>, Vec<(&TagSet, &Rows)>> = BTreeMap::new();
    for (tags, tag_rows) in rows {
        if tag_rows.is_empty() {
            continue;
        }
        groups
            .entry(group_key(tags, dimensions))
            .or_default()
            .push((tags, tag_rows));
    }
    groups
}

/// The values of the `GROUP BY` tags of a tag set, empty for tags it lacks.
pub fn group_key(tags: &TagSet, dimensions: &[String]) -> Vec<String> {
    dimensions
        .iter()
        .map(|d| {
            tags.iter()
                .find(|(k, _)| k == d)
                .map_or(String::new(), |(_, v)| v.clone())
        })
        .collect()
}

/// Builds one row per stored point of the group, merged across tag sets in time order.
fn raw_rows(group: &Group<'_>, columns: &[Column]) -> Vec<Vec<Cell>> {
    let mut merged: Vec<(i64, &TagSet, &Vec<Option<Value>>)> = Vec::new();
    for (tags, rows) in &group.members {
        merged.extend(rows.iter().map(|(ts, values)| (*ts, *tags, values)));
    }
    merged.sort_by_key(|(ts, _, _)| *ts);

    let mut out = Vec::with_capacity(merged.len());
    for (ts, tags, values) in merged {
        let mut row = vec![Cell::Time(ts)];
        let mut has_field = false;
        for column in columns {
            let cell = match &column.source {
                ColumnSource::Field(name) => {
                    let value = group.field_index.get(name).and_then(|&i| values[i]);
                    has_field |= value.is_some();
                    value.map_or(Cell::Null, Cell::from)
                }
                ColumnSource::Tag(key) => tags
                    .iter()
                    .find(|(k, _)| k == key)
                    .map_or(Cell::Null, |(_, v)| Cell::Text(v.clone())),
                ColumnSource::Call(_) => Cell::Null,
            };
            row.push(cell);
        }
        if has_field {
            out.push(row);
        }
    }
    out
}

/// Collects the time-ordered values of one field across the group's tag sets.
pub fn field_points(group: &Group<'_>, field: &str) -> Vec<(i64, Value)> {
    let Some(&index) = group.field_index.get(field) else {
        return Vec::new();
    };
    let mut points: Vec<(i64, Value)> = Vec::new();
    for (_, rows) in &group.members {
        points.extend(
            rows.iter()
                .filter_map(|(ts, values)| values[index].map(|v| (*ts, v))),
        );
    }
    points.sort_by_key(|(ts, _)| *ts);
    points
}

/// Rows of transforms over raw points, joined by time across columns.
fn raw_transform_rows(group: &Group<'_>, columns: &[Column]) -> Vec<Vec<Cell>> {
    let mut by_time: BTreeMap<i64, Vec<Cell>> = BTreeMap::new();
    for (index, column) in columns.iter().enumerate() {
        let ColumnSource::Call(call) = &column.source else {
            continue;
        };
        let points = field_points(group, call_field(call));
        let unit = call.unit.unwrap_or(1_000_000_000);
        for (ts, value) in functions::transform(call.function, &points, unit) {
            let row = by_time
                .entry(ts)
                .or_insert_with(|| vec![Cell::Null; columns.len()]);
            row[index] = Cell::from(value);
        }
    }
    by_time
        .into_iter()
        .map(|(ts, cells)| {
            let mut row = vec![Cell::Time(ts)];
            row.extend(cells);
            row
        })
        .collect()
}

/// Whether the function of a column reports the time of the point it selected.
pub fn is_selector_column(column: &Column) -> bool {
    matches!(&column.source, ColumnSource::Call(call)
        if call.function.is_selector() && matches!(call.input, CallInput::Field(_)))
}

/// The function that runs per window: the call itself, or the aggregate inside a transform.
pub fn window_call(call: &Call) -> &Call {
    match &call.input {
        CallInput::Call(inner) => inner,
        CallInput::Field(_) => call,
    }
}

/// Whether a call's outer function is a transform over windows.
pub fn is_windowed_transform(call: &Call) -> bool {
    call.function.is_transform() && matches!(call.input, CallInput::Call(_))
}

/// Whether the function counts points, so empty windows report 0.
pub fn is_count(call: &Call) -> bool {
    call.function == Function::Count
}
