//! `SHOW` statements, answered from the store's series list.

use std::collections::BTreeSet;

use crate::model::ValueKind;

use super::ast::{KeyMatch, MeasurementMatch, ShowMeasurements, ShowTagValues, ShowTags};
use super::catalog::Catalog;
use super::response::{Cell, Series};
use super::{DATABASE, EvalContext, RETENTION_POLICY};

pub fn databases() -> Vec<Series> {
    let values = vec![vec![Cell::Text(DATABASE.to_owned())]];
    vec![Series::new(Some("databases"), &["name"], values)]
}

pub fn retention_policies(
    context: &EvalContext<'_>,
    database: Option<&str>,
) -> Result<Vec<Series>, String> {
    context.check_database(database)?;
    let row = vec![
        Cell::Text(RETENTION_POLICY.to_owned()),
        Cell::Text("0s".to_owned()),
        Cell::Text("168h0m0s".to_owned()),
        Cell::Integer(1),
        Cell::Bool(true),
    ];
    let columns = [
        "name",
        "duration",
        "shardGroupDuration",
        "replicaN",
        "default",
    ];
    Ok(vec![Series::new(None, &columns, vec![row])])
}

pub fn measurements(
    context: &EvalContext<'_>,
    show: &ShowMeasurements,
) -> Result<Vec<Series>, String> {
    context.check_database(show.database.as_deref())?;
    let catalog = Catalog::load(context)?;
    let mut names = Vec::new();
    for name in catalog.measurements() {
        let wanted = match &show.with_measurement {
            None => true,
            Some(MeasurementMatch::Name(wanted)) => wanted == name,
            Some(MeasurementMatch::Regex(re)) => re.0.is_match(name),
        };
        if wanted
            && !catalog
                .matching_tag_sets(name, show.condition.as_ref())?
                .is_empty()
        {
            names.push(vec![Cell::Text(name.to_owned())]);
        }
    }
    let names = page(names, show.limit, show.offset);
    if names.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Series::new(Some("measurements"), &["name"], names)])
}

pub fn tag_keys(context: &EvalContext<'_>, show: &ShowTags) -> Result<Vec<Series>, String> {
    per_measurement(context, show, &["tagKey"], |catalog, measurement| {
        let sets = catalog.matching_tag_sets(measurement, show.condition.as_ref())?;
        let keys: BTreeSet<&str> = sets.iter().flatten().map(|(k, _)| k.as_str()).collect();
        Ok(keys
            .into_iter()
            .map(|k| vec![Cell::Text(k.to_owned())])
            .collect())
    })
}

pub fn tag_values(context: &EvalContext<'_>, show: &ShowTagValues) -> Result<Vec<Series>, String> {
    per_measurement(
        context,
        &show.show,
        &["key", "value"],
        |catalog, measurement| {
            let sets = catalog.matching_tag_sets(measurement, show.show.condition.as_ref())?;
            let pairs: BTreeSet<&(String, String)> = sets
                .iter()
                .flatten()
                .filter(|(key, _)| key_matches(&show.key, key))
                .collect();
            Ok(pairs
                .into_iter()
                .map(|(k, v)| vec![Cell::Text(k.clone()), Cell::Text(v.clone())])
                .collect())
        },
    )
}

fn key_matches(key_match: &KeyMatch, key: &str) -> bool {
    match key_match {
        KeyMatch::Eq(wanted) => wanted == key,
        KeyMatch::NotEq(unwanted) => unwanted != key,
        KeyMatch::In(keys) => keys.iter().any(|k| k == key),
        KeyMatch::Regex(re) => re.0.is_match(key),
        KeyMatch::NotRegex(re) => !re.0.is_match(key),
    }
}

pub fn field_keys(context: &EvalContext<'_>, show: &ShowTags) -> Result<Vec<Series>, String> {
    per_measurement(
        context,
        show,
        &["fieldKey", "fieldType"],
        |catalog, measurement| {
            let kinds = catalog.field_kinds(context, measurement)?;
            Ok(kinds
                .into_iter()
                .map(|(field, kind)| {
                    let type_name = match kind {
                        ValueKind::Bool => "boolean",
                        ValueKind::Number => "float",
                    };
                    vec![Cell::Text(field), Cell::Text(type_name.to_owned())]
                })
                .collect())
        },
    )
}

/// `SHOW SERIES`: one row per series key in line-protocol form, `m,tag=value`.
pub fn series(context: &EvalContext<'_>, show: &ShowTags) -> Result<Vec<Series>, String> {
    let catalog = Catalog::load(context)?;
    let mut keys = Vec::new();
    for measurement in catalog.resolve(context, &show.sources)? {
        for tags in catalog.matching_tag_sets(&measurement, show.condition.as_ref())? {
            let mut key = escape_key(&measurement, &[',', ' ']);
            for (k, v) in &tags {
                key.push(',');
                key.push_str(&escape_key(k, &[',', ' ', '=']));
                key.push('=');
                key.push_str(&escape_key(v, &[',', ' ', '=']));
            }
            keys.push(vec![Cell::Text(key)]);
        }
    }
    let keys = page(keys, show.limit, show.offset);
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Series::new(None, &["key"], keys)])
}

fn escape_key(text: &str, special: &[char]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Builds one series per measurement of `FROM` (or every measurement), skipping those
/// with no rows; `LIMIT` and `OFFSET` apply within each.
fn per_measurement(
    context: &EvalContext<'_>,
    show: &ShowTags,
    columns: &[&str],
    rows_of: impl Fn(&Catalog, &str) -> Result<Vec<Vec<Cell>>, String>,
) -> Result<Vec<Series>, String> {
    context.check_database(show.database.as_deref())?;
    let catalog = Catalog::load(context)?;
    let mut out = Vec::new();
    for measurement in catalog.resolve(context, &show.sources)? {
        let rows = page(rows_of(&catalog, &measurement)?, show.limit, show.offset);
        if !rows.is_empty() {
            out.push(Series::new(Some(&measurement), columns, rows));
        }
    }
    Ok(out)
}

fn page<T>(rows: Vec<T>, limit: Option<usize>, offset: usize) -> Vec<T> {
    rows.into_iter()
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .collect()
}
