//! `WHERE` evaluation: the time range is taken out of the condition, and the rest is
//! evaluated against each series' tags and each row's fields.

use std::collections::HashSet;

use crate::model::Value;

use super::ast::{CompareOp, Expr, Operand, RefKind, VarRef};
use super::time::parse_time_string;

/// An inclusive time range in nanoseconds; unbounded ends are `i64::MIN` and `i64::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    pub min: i64,
    pub max: i64,
}

impl TimeRange {
    pub const ALL: TimeRange = TimeRange {
        min: i64::MIN,
        max: i64::MAX,
    };

    pub fn is_empty(self) -> bool {
        self.min > self.max
    }

    pub fn has_min(self) -> bool {
        self.min != i64::MIN
    }

    pub fn has_max(self) -> bool {
        self.max != i64::MAX
    }
}

/// Splits a condition into its time range and the remaining tag and field condition.
///
/// Time comparisons must be joined to the rest with `AND`, as in InfluxDB 1.x; a time
/// comparison under `OR` is rejected.
pub fn split_time(condition: Option<&Expr>) -> Result<(TimeRange, Option<Expr>), String> {
    let Some(expr) = condition else {
        return Ok((TimeRange::ALL, None));
    };
    let mut range = TimeRange::ALL;
    let rest = take_time(expr, &mut range)?;
    Ok((range, rest))
}

fn take_time(expr: &Expr, range: &mut TimeRange) -> Result<Option<Expr>, String> {
    match expr {
        Expr::And(left, right) => {
            let left = take_time(left, range)?;
            let right = take_time(right, range)?;
            Ok(match (left, right) {
                (Some(l), Some(r)) => Some(Expr::And(Box::new(l), Box::new(r))),
                (l, r) => l.or(r),
            })
        }
        Expr::Or(..) => {
            if mentions_time(expr) {
                return Err(
                    "invalid condition: time comparisons cannot be combined with OR".into(),
                );
            }
            Ok(Some(expr.clone()))
        }
        Expr::Compare { left, op, right } => match (left, right) {
            (Operand::Time, value) => apply_time_bound(*op, value, range).map(|()| None),
            (value, Operand::Time) => apply_time_bound(op.flipped(), value, range).map(|()| None),
            _ => Ok(Some(expr.clone())),
        },
    }
}

fn mentions_time(expr: &Expr) -> bool {
    match expr {
        Expr::And(l, r) | Expr::Or(l, r) => mentions_time(l) || mentions_time(r),
        Expr::Compare { left, right, .. } => *left == Operand::Time || *right == Operand::Time,
    }
}

fn apply_time_bound(op: CompareOp, value: &Operand, range: &mut TimeRange) -> Result<(), String> {
    let t = match value {
        Operand::TimeValue(t) | Operand::Duration(t) => *t,
        Operand::Number(n) if n.fract() == 0.0 => *n as i64,
        Operand::Str(s) => parse_time_string(s)
            .ok_or_else(|| format!("invalid time string {s:?}: use RFC 3339"))?,
        other => return Err(format!("invalid time comparison with {other:?}")),
    };
    match op {
        CompareOp::Gt => range.min = range.min.max(t.saturating_add(1)),
        CompareOp::GtEq => range.min = range.min.max(t),
        CompareOp::Lt => range.max = range.max.min(t.saturating_sub(1)),
        CompareOp::LtEq => range.max = range.max.min(t),
        CompareOp::Eq => {
            range.min = range.min.max(t);
            range.max = range.max.min(t);
        }
        CompareOp::NotEq | CompareOp::Regex | CompareOp::NotRegex => {
            return Err("invalid time comparison operator: use <, <=, >, >= or =".into());
        }
    }
    Ok(())
}

/// Whether a name refers to a field of the measurement, rather than a tag.
fn is_field(var: &VarRef, field_keys: &HashSet<String>) -> bool {
    match var.kind {
        Some(RefKind::Field) => true,
        Some(RefKind::Tag) => false,
        None => field_keys.contains(&var.name),
    }
}

/// Collects the field names a condition reads.
pub fn referenced_fields(expr: &Expr, field_keys: &HashSet<String>, out: &mut Vec<String>) {
    match expr {
        Expr::And(l, r) | Expr::Or(l, r) => {
            referenced_fields(l, field_keys, out);
            referenced_fields(r, field_keys, out);
        }
        Expr::Compare { left, right, .. } => {
            for operand in [left, right] {
                if let Operand::Var(var) = operand
                    && is_field(var, field_keys)
                    && !out.contains(&var.name)
                {
                    out.push(var.name.clone());
                }
            }
        }
    }
}

/// Field values of one row, by field name.
pub type FieldLookup<'a> = &'a dyn Fn(&str) -> Option<Value>;

/// The data a condition is evaluated against: one series' tags and optionally one row.
pub struct RowContext<'a> {
    pub tags: &'a [(String, String)],
    pub field_keys: &'a HashSet<String>,
    /// Field values of the row; `None` when evaluating per series, before rows exist.
    pub fields: Option<FieldLookup<'a>>,
}

/// Evaluates a tag and field condition. Without row fields, a field comparison counts as
/// true, so evaluating per series never drops a series that some row could match.
pub fn evaluate(expr: &Expr, row: &RowContext<'_>) -> bool {
    match expr {
        Expr::And(l, r) => evaluate(l, row) && evaluate(r, row),
        Expr::Or(l, r) => evaluate(l, row) || evaluate(r, row),
        Expr::Compare {
            left: Operand::Var(var),
            op,
            right,
        } => compare_var(var, *op, right, row),
        Expr::Compare {
            left,
            op,
            right: Operand::Var(var),
        } => compare_var(var, op.flipped(), left, row),
        Expr::Compare { left, op, right } => compare_literals(left, *op, right),
    }
}

fn compare_var(var: &VarRef, op: CompareOp, literal: &Operand, row: &RowContext<'_>) -> bool {
    if !is_field(var, row.field_keys) {
        let value = row
            .tags
            .iter()
            .find(|(k, _)| *k == var.name)
            .map_or("", |(_, v)| v.as_str());
        return compare_tag(value, op, literal);
    }
    let Some(fields) = row.fields else {
        return true;
    };
    match fields(&var.name) {
        Some(value) => compare_field(value, op, literal),
        // A missing field value matches no comparison, as in InfluxDB.
        None => false,
    }
}

fn compare_tag(value: &str, op: CompareOp, literal: &Operand) -> bool {
    match (op, literal) {
        (CompareOp::Eq, Operand::Str(s)) => value == s,
        (CompareOp::NotEq, Operand::Str(s)) => value != s,
        (CompareOp::Regex, Operand::Regex(re)) => re.0.is_match(value),
        (CompareOp::NotRegex, Operand::Regex(re)) => !re.0.is_match(value),
        (CompareOp::Lt, Operand::Str(s)) => value < s.as_str(),
        (CompareOp::LtEq, Operand::Str(s)) => value <= s.as_str(),
        (CompareOp::Gt, Operand::Str(s)) => value > s.as_str(),
        (CompareOp::GtEq, Operand::Str(s)) => value >= s.as_str(),
        _ => false,
    }
}

fn compare_field(value: Value, op: CompareOp, literal: &Operand) -> bool {
    let right = match (value, literal) {
        (Value::Bool(b), Operand::Bool(r)) => {
            return match op {
                CompareOp::Eq => b == *r,
                CompareOp::NotEq => b != *r,
                _ => false,
            };
        }
        (Value::Number(_), Operand::Number(r)) => *r,
        _ => return false,
    };
    compare_numbers(value.as_f64(), op, right)
}

fn compare_numbers(left: f64, op: CompareOp, right: f64) -> bool {
    match op {
        CompareOp::Eq => left == right,
        CompareOp::NotEq => left != right,
        CompareOp::Lt => left < right,
        CompareOp::LtEq => left <= right,
        CompareOp::Gt => left > right,
        CompareOp::GtEq => left >= right,
        CompareOp::Regex | CompareOp::NotRegex => false,
    }
}

fn compare_literals(left: &Operand, op: CompareOp, right: &Operand) -> bool {
    match (left, right) {
        (Operand::Number(l), Operand::Number(r)) => compare_numbers(*l, op, *r),
        (Operand::Str(l), Operand::Str(r)) => match op {
            CompareOp::Eq => l == r,
            CompareOp::NotEq => l != r,
            _ => false,
        },
        (Operand::Bool(l), Operand::Bool(r)) => match op {
            CompareOp::Eq => l == r,
            CompareOp::NotEq => l != r,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::influxql::ast::Statement;
    use crate::api::influxql::parser::parse_query;

    fn condition(where_clause: &str) -> Expr {
        let query = format!("SELECT x FROM m WHERE {where_clause}");
        let Statement::Select(select) = parse_query(&query, 10_000).expect("parses").remove(0)
        else {
            panic!("expected SELECT");
        };
        select.condition.expect("a condition")
    }

    fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn time_bounds_from_and() {
        let expr = condition("time > 100 AND time <= 200ms AND site = 'a'");
        let (range, rest) = split_time(Some(&expr)).expect("valid");
        assert_eq!(
            range,
            TimeRange {
                min: 101,
                max: 200_000_000
            }
        );
        assert!(rest.is_some());
    }

    #[test]
    fn time_string_bound() {
        let expr = condition("time >= '1970-01-01T00:00:01Z'");
        let (range, rest) = split_time(Some(&expr)).expect("valid");
        assert_eq!(range.min, 1_000_000_000);
        assert_eq!(rest, None);
    }

    #[test]
    fn time_under_or_rejected() {
        let expr = condition("time > 1 OR site = 'a'");
        assert!(split_time(Some(&expr)).is_err());
    }

    #[test]
    fn tag_conditions_with_parentheses() {
        let expr = condition("(site = 'a' OR site = 'b') AND device !~ /^x/");
        let keys = HashSet::new();
        let check = |pairs: &[(&str, &str)]| {
            let tags = tags(pairs);
            evaluate(
                &expr,
                &RowContext {
                    tags: &tags,
                    field_keys: &keys,
                    fields: None,
                },
            )
        };
        assert!(check(&[("site", "a"), ("device", "d1")]));
        assert!(check(&[("site", "b"), ("device", "d1")]));
        assert!(!check(&[("site", "c"), ("device", "d1")]));
        assert!(!check(&[("site", "a"), ("device", "x1")]));
    }

    #[test]
    fn missing_tag_is_empty_string() {
        let expr = condition("site = ''");
        let keys = HashSet::new();
        let ctx = RowContext {
            tags: &[],
            field_keys: &keys,
            fields: None,
        };
        assert!(evaluate(&expr, &ctx));
    }

    #[test]
    fn field_condition_per_row() {
        let expr = condition("gas_lel > 25 AND site = 'a'");
        let keys: HashSet<String> = ["gas_lel".to_owned()].into();
        let tags = tags(&[("site", "a")]);
        let high = |_: &str| Some(Value::Number(30.0));
        let low = |_: &str| Some(Value::Number(10.0));
        let series_level = RowContext {
            tags: &tags,
            field_keys: &keys,
            fields: None,
        };
        assert!(evaluate(&expr, &series_level));
        assert!(evaluate(
            &expr,
            &RowContext {
                fields: Some(&high),
                ..series_level
            }
        ));
        let series_level = RowContext {
            tags: &tags,
            field_keys: &keys,
            fields: None,
        };
        assert!(!evaluate(
            &expr,
            &RowContext {
                fields: Some(&low),
                ..series_level
            }
        ));
    }
}
