//! The store's series, indexed by measurement and tag set, loaded once per statement.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::model::{Timestamp, ValueKind};
use crate::storage::{Query, Selector, SeriesKey};

use super::ast::{MeasurementMatch, Source};
use super::condition::{RowContext, evaluate, split_time};
use super::{EvalContext, RETENTION_POLICY};

/// Sorted tag pairs identifying one InfluxDB series of a measurement.
pub type TagSet = Vec<(String, String)>;

/// Every series of the store.
pub struct Catalog {
    keys: Vec<SeriesKey>,
}

impl Catalog {
    pub fn load(context: &EvalContext<'_>) -> Result<Catalog, String> {
        let mut keys = context
            .store
            .series(&Selector::default())
            .map_err(|e| format!("listing series failed: {e}"))?;
        keys.sort();
        Ok(Catalog { keys })
    }

    pub fn measurements(&self) -> BTreeSet<&str> {
        self.keys.iter().map(|k| k.measurement.as_str()).collect()
    }

    /// Resolves `FROM` entries to measurement names, sorted and unique. No entries means
    /// every measurement, as `SHOW TAG KEYS` without `FROM` reads.
    pub fn resolve(
        &self,
        context: &EvalContext<'_>,
        sources: &[Source],
    ) -> Result<Vec<String>, String> {
        let all = self.measurements();
        if sources.is_empty() {
            context.check_database(None)?;
            return Ok(all.into_iter().map(str::to_owned).collect());
        }
        let mut names = BTreeSet::new();
        for source in sources {
            context.check_database(source.database.as_deref())?;
            if let Some(rp) = source
                .retention_policy
                .as_deref()
                .filter(|rp| *rp != RETENTION_POLICY)
            {
                return Err(format!("retention policy not found: {rp}"));
            }
            match &source.measurement {
                MeasurementMatch::Name(name) => {
                    names.insert(name.clone());
                }
                MeasurementMatch::Regex(re) => {
                    names.extend(
                        all.iter()
                            .filter(|m| re.0.is_match(m))
                            .map(|m| (*m).to_owned()),
                    );
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    pub fn keys_of<'a>(&'a self, measurement: &'a str) -> impl Iterator<Item = &'a SeriesKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.measurement == measurement)
    }

    pub fn field_keys(&self, measurement: &str) -> HashSet<String> {
        self.keys_of(measurement).map(|k| k.field.clone()).collect()
    }

    pub fn tag_keys(&self, measurement: &str) -> BTreeSet<String> {
        self.keys_of(measurement)
            .flat_map(|k| k.tags.iter().map(|(key, _)| key.clone()))
            .collect()
    }

    /// The measurement's tag sets, each with the fields stored under it.
    pub fn tag_sets(&self, measurement: &str) -> BTreeMap<TagSet, BTreeSet<String>> {
        let mut sets: BTreeMap<TagSet, BTreeSet<String>> = BTreeMap::new();
        for key in self.keys_of(measurement) {
            sets.entry(key.tags.clone())
                .or_default()
                .insert(key.field.clone());
        }
        sets
    }

    /// Tag sets of a measurement that a tag condition can match. Time and field parts of
    /// the condition are ignored here, because series listings carry no rows.
    pub fn matching_tag_sets(
        &self,
        measurement: &str,
        condition: Option<&super::ast::Expr>,
    ) -> Result<Vec<TagSet>, String> {
        // NOTE: time bounds in SHOW statements are accepted but do not narrow the listing,
        // so a series with no points in the range is still listed.
        let (_, rest) = split_time(condition)?;
        let field_keys = self.field_keys(measurement);
        let sets = self.tag_sets(measurement).into_keys();
        Ok(sets
            .filter(|tags| {
                rest.as_ref().is_none_or(|expr| {
                    evaluate(
                        expr,
                        &RowContext {
                            tags,
                            field_keys: &field_keys,
                            fields: None,
                        },
                    )
                })
            })
            .collect())
    }

    /// The value kind of each field of a measurement, read from one stored point.
    pub fn field_kinds(
        &self,
        context: &EvalContext<'_>,
        measurement: &str,
    ) -> Result<BTreeMap<String, ValueKind>, String> {
        let mut kinds = BTreeMap::new();
        for field in self.field_keys(measurement) {
            let query = Query {
                selector: Selector {
                    measurement: Some(measurement.to_owned()),
                    tags: Vec::new(),
                    field: Some(field.clone()),
                },
                from: Timestamp(ns_to_ms_floor(i64::MIN)),
                to: Timestamp(ns_to_ms_floor(i64::MAX) + 1),
                aggregation: None,
                limit: Some(1),
            };
            let data = context
                .store
                .query(&query)
                .map_err(|e| format!("reading {measurement}.{field} failed: {e}"))?;
            let kind = data.first().map_or(ValueKind::Number, |d| d.kind);
            kinds.insert(field, kind);
        }
        Ok(kinds)
    }
}

/// Converts nanoseconds to milliseconds, rounding down.
pub fn ns_to_ms_floor(ns: i64) -> i64 {
    ns.div_euclid(1_000_000)
}

/// Converts nanoseconds to milliseconds, rounding up.
pub fn ns_to_ms_ceil(ns: i64) -> i64 {
    let ms = ns.div_euclid(1_000_000);
    if ns.rem_euclid(1_000_000) == 0 {
        ms
    } else {
        ms + 1
    }
}
