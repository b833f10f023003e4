//! Statement results and their rendering in InfluxDB 1.x's JSON shape:
//! `{"statement_id": 0, "series": [{"name", "tags", "columns", "values"}]}` or
//! `{"statement_id": 0, "error": "..."}`.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::time::{Epoch, format_time};

/// One cell of a result row.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    /// Nanoseconds since the epoch, rendered per the `epoch` parameter.
    Time(i64),
    Number(f64),
    Integer(i64),
    Bool(bool),
    Text(String),
}

impl From<crate::model::Value> for Cell {
    fn from(value: crate::model::Value) -> Cell {
        match value {
            crate::model::Value::Bool(b) => Cell::Bool(b),
            crate::model::Value::Number(n) => Cell::Number(n),
        }
    }
}

/// One result series.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: Option<String>,
    /// Present when the statement groups by tags; rendered as a JSON object.
    pub tags: Option<BTreeMap<String, String>>,
    pub columns: Vec<String>,
    pub values: Vec<Vec<Cell>>,
}

impl Series {
    pub fn new(name: Option<&str>, columns: &[&str], values: Vec<Vec<Cell>>) -> Series {
        Series {
            name: name.map(str::to_owned),
            tags: None,
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            values,
        }
    }
}

/// Series plus the time zone their times are rendered in (from `tz()`).
pub type SeriesOutput = (Vec<Series>, Option<chrono_tz::Tz>);

/// The outcome of one statement.
pub struct StatementResult {
    pub outcome: Result<SeriesOutput, String>,
}

/// Options that apply to every statement of a request.
#[derive(Clone, Copy, Debug)]
pub struct Rendering {
    pub epoch: Option<Epoch>,
}

impl StatementResult {
    /// Renders the result; statements with no series carry only their `statement_id`.
    pub fn render(&self, statement_id: usize, rendering: Rendering) -> Json {
        match &self.outcome {
            Err(message) => json!({ "statement_id": statement_id, "error": message }),
            Ok((series, _)) if series.is_empty() => json!({ "statement_id": statement_id }),
            Ok((series, tz)) => {
                let series: Vec<Json> = series
                    .iter()
                    .map(|s| render_series(s, rendering, *tz))
                    .collect();
                json!({ "statement_id": statement_id, "series": series })
            }
        }
    }
}

fn render_series(series: &Series, rendering: Rendering, tz: Option<chrono_tz::Tz>) -> Json {
    let mut object = serde_json::Map::new();
    if let Some(name) = &series.name {
        object.insert("name".into(), Json::String(name.clone()));
    }
    if let Some(tags) = &series.tags {
        let tags: serde_json::Map<String, Json> = tags
            .iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect();
        object.insert("tags".into(), Json::Object(tags));
    }
    object.insert("columns".into(), json!(series.columns));
    let values: Vec<Json> = series
        .values
        .iter()
        .map(|row| {
            Json::Array(
                row.iter()
                    .map(|cell| render_cell(cell, rendering, tz))
                    .collect(),
            )
        })
        .collect();
    object.insert("values".into(), Json::Array(values));
    Json::Object(object)
}

/// Largest integer that an f64 holds exactly.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

fn render_cell(cell: &Cell, rendering: Rendering, tz: Option<chrono_tz::Tz>) -> Json {
    match cell {
        Cell::Null => Json::Null,
        Cell::Time(ns) => match rendering.epoch {
            Some(epoch) => json!(epoch.convert(*ns)),
            None => Json::String(format_time(*ns, tz)),
        },
        // Go's encoder, which InfluxDB uses, writes integral floats without a fraction.
        Cell::Number(n) if n.fract() == 0.0 && n.abs() < MAX_EXACT_INTEGER => json!(*n as i64),
        Cell::Number(n) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Cell::Integer(n) => json!(n),
        Cell::Bool(b) => Json::Bool(*b),
        Cell::Text(s) => Json::String(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_result_has_only_statement_id() {
        let result = StatementResult {
            outcome: Ok((Vec::new(), None)),
        };
        let rendering = Rendering { epoch: None };
        assert_eq!(result.render(3, rendering), json!({ "statement_id": 3 }));
    }

    #[test]
    fn error_result() {
        let result = StatementResult {
            outcome: Err("database not found: x".into()),
        };
        let rendering = Rendering { epoch: None };
        let rendered = result.render(0, rendering);
        assert_eq!(
            rendered,
            json!({ "statement_id": 0, "error": "database not found: x" })
        );
    }

    #[test]
    fn series_shape_and_epoch() {
        let mut series = Series::new(
            Some("cpu"),
            &["time", "mean"],
            vec![vec![Cell::Time(1_500_000_000), Cell::Number(2.5)]],
        );
        series.tags = Some([("host".to_owned(), "a".to_owned())].into());
        let result = StatementResult {
            outcome: Ok((vec![series], None)),
        };
        let rendered = result.render(
            0,
            Rendering {
                epoch: Some(Epoch::Milliseconds),
            },
        );
        let expected = json!({ "statement_id": 0, "series": [{
            "name": "cpu", "tags": { "host": "a" }, "columns": ["time", "mean"],
            "values": [[1500, 2.5]],
        }]});
        assert_eq!(rendered, expected);
    }

    #[test]
    fn integral_float_has_no_fraction() {
        let rendering = Rendering { epoch: None };
        assert_eq!(
            render_cell(&Cell::Number(25.0), rendering, None).to_string(),
            "25"
        );
        assert_eq!(
            render_cell(&Cell::Number(f64::NAN), rendering, None),
            Json::Null
        );
    }
}
