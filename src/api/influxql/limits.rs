//! Per-request limits on what a query may read and compute, like InfluxDB 1.x's
//! `max-select-series`, `max-select-point` and `max-select-buckets`, so one query cannot
//! exhaust the server's memory.

use std::cell::Cell;

/// The limits of one `/query` request, summed over all its statements and series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryLimits {
    /// Maximum number of series (measurement and tag set) that the request selects.
    pub max_series: u64,
    /// Maximum number of raw points that the request reads from the store.
    pub max_points: u64,
    /// Maximum number of `GROUP BY time()` buckets, summed over output series.
    pub max_buckets: u64,
}

impl QueryLimits {
    pub const DEFAULT_MAX_SERIES: u64 = 10_000;
    pub const DEFAULT_MAX_POINTS: u64 = 5_000_000;
    pub const DEFAULT_MAX_BUCKETS: u64 = 1_000_000;
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_series: Self::DEFAULT_MAX_SERIES,
            max_points: Self::DEFAULT_MAX_POINTS,
            max_buckets: Self::DEFAULT_MAX_BUCKETS,
        }
    }
}

/// The limits of one request and what its statements have used so far. Evaluation runs
/// on one thread, so plain cells suffice.
#[derive(Debug)]
pub struct Budget {
    limits: QueryLimits,
    series: Cell<u64>,
    points: Cell<u64>,
    buckets: Cell<u64>,
}

impl Budget {
    pub fn new(limits: QueryLimits) -> Budget {
        Budget {
            limits,
            series: Cell::new(0),
            points: Cell::new(0),
            buckets: Cell::new(0),
        }
    }

    /// Raw points the request may still read.
    pub fn remaining_points(&self) -> u64 {
        self.limits.max_points.saturating_sub(self.points.get())
    }

    /// Buckets the request may still compute.
    pub fn remaining_buckets(&self) -> u64 {
        self.limits.max_buckets.saturating_sub(self.buckets.get())
    }

    /// Counts `count` selected series, failing when the request exceeds its limit.
    pub fn charge_series(&self, count: u64) -> Result<(), String> {
        let used = self.series.get().saturating_add(count);
        self.series.set(used);
        if used > self.limits.max_series {
            return Err(format!(
                "max-select-series limit exceeded: the query selects {used} series, over the \
                 limit of {} ([api] query_max_series); add a tag filter to the WHERE clause \
                 or select fewer measurements",
                self.limits.max_series
            ));
        }
        Ok(())
    }

    /// Counts `count` raw points read, failing when the request exceeds its limit.
    pub fn charge_points(&self, count: u64) -> Result<(), String> {
        let used = self.points.get().saturating_add(count);
        self.points.set(used);
        if used > self.limits.max_points {
            return Err(format!(
                "max-select-point limit exceeded: the query reads more than {} points \
                 ([api] query_max_points), {used} so far; use a shorter time range, a tag \
                 filter or an aggregate with GROUP BY time()",
                self.limits.max_points
            ));
        }
        Ok(())
    }

    /// Checks before allocation that `per_series` buckets for each of `series` output
    /// series fit in what remains.
    pub fn check_buckets(&self, per_series: u64, series: u64) -> Result<(), String> {
        let needed = per_series.saturating_mul(series);
        if needed > self.remaining_buckets() {
            let total = self.buckets.get().saturating_add(needed);
            let detail = format!(" ({per_series} per series x {series} series)");
            return Err(self.buckets_error(&total.to_string(), &detail));
        }
        Ok(())
    }

    /// Counts `count` computed buckets, failing when the request exceeds its limit.
    pub fn charge_buckets(&self, count: u64) -> Result<(), String> {
        let used = self.buckets.get().saturating_add(count);
        self.buckets.set(used);
        if used > self.limits.max_buckets {
            return Err(self.buckets_error(&used.to_string(), ""));
        }
        Ok(())
    }

    /// The error for a request that needs `needed` buckets in all, such as `"1200"` or
    /// `"more than 1000"`.
    pub fn buckets_error(&self, needed: &str, detail: &str) -> String {
        format!(
            "max-select-buckets limit exceeded: the query needs {needed} GROUP BY time() \
             buckets{detail}, over the limit of {} ([api] query_max_buckets); use a larger \
             GROUP BY time() interval, a shorter time range or a tag filter",
            self.limits.max_buckets
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> QueryLimits {
        QueryLimits {
            max_series: 2,
            max_points: 10,
            max_buckets: 100,
        }
    }

    #[test]
    fn series_limit_counts_across_calls() {
        let budget = Budget::new(limits());
        assert!(budget.charge_series(2).is_ok());
        let error = budget.charge_series(1).expect_err("third series exceeds");
        assert!(
            error.contains("max-select-series limit exceeded"),
            "{error}"
        );
        assert!(error.contains("3 series"), "{error}");
    }

    #[test]
    fn points_limit_names_key() {
        let budget = Budget::new(limits());
        assert!(budget.charge_points(10).is_ok());
        assert_eq!(budget.remaining_points(), 0);
        let error = budget.charge_points(1).expect_err("eleventh point exceeds");
        assert!(error.contains("query_max_points"), "{error}");
    }

    #[test]
    fn bucket_check_precedes_charge() {
        let budget = Budget::new(limits());
        let error = budget.check_buckets(60, 2).expect_err("120 buckets exceed");
        assert!(error.contains("needs 120"), "{error}");
        assert!(error.contains("60 per series x 2 series"), "{error}");
        assert_eq!(budget.remaining_buckets(), 100);
        assert!(budget.charge_buckets(100).is_ok());
        assert!(budget.charge_buckets(1).is_err());
    }
}
