//! Syntax tree of the InfluxQL statements the endpoint supports.

/// One statement of a query.
#[derive(Clone, Debug, PartialEq)]
pub enum Statement {
    Select(Box<SelectStatement>),
    ShowDatabases,
    ShowRetentionPolicies { database: Option<String> },
    ShowMeasurements(ShowMeasurements),
    ShowTagKeys(ShowTags),
    ShowTagValues(ShowTagValues),
    ShowFieldKeys(ShowTags),
    ShowSeries(ShowTags),
}

/// `SHOW MEASUREMENTS [ON db] [WITH MEASUREMENT =|=~ ...] [WHERE ...] [LIMIT n] [OFFSET n]`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ShowMeasurements {
    pub database: Option<String>,
    pub with_measurement: Option<MeasurementMatch>,
    pub condition: Option<Expr>,
    pub limit: Option<usize>,
    pub offset: usize,
}

/// Statements of the shape `SHOW X [ON db] [FROM ...] [WHERE ...] [LIMIT n] [OFFSET n]`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ShowTags {
    pub database: Option<String>,
    pub sources: Vec<Source>,
    pub condition: Option<Expr>,
    pub limit: Option<usize>,
    pub offset: usize,
}

/// `SHOW TAG VALUES ... WITH KEY = "k" | IN ("a", "b") | =~ /re/ | != "k" | !~ /re/`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShowTagValues {
    pub show: ShowTags,
    pub key: KeyMatch,
}

/// Which tag keys `SHOW TAG VALUES` lists.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyMatch {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    Regex(Regex),
    NotRegex(Regex),
}

/// A measurement name or a pattern over measurement names.
#[derive(Clone, Debug, PartialEq)]
pub enum MeasurementMatch {
    Name(String),
    Regex(Regex),
}

/// One entry of a `FROM` clause.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub database: Option<String>,
    pub retention_policy: Option<String>,
    pub measurement: MeasurementMatch,
}

/// A compiled regex that compares by its source text, so syntax trees stay comparable.
#[derive(Clone, Debug)]
pub struct Regex(pub regex::Regex);

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// `SELECT fields FROM sources [WHERE] [GROUP BY] [fill()] [ORDER BY] [LIMIT] [OFFSET]
/// [SLIMIT] [SOFFSET] [tz()]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectStatement {
    pub fields: Vec<SelectField>,
    pub sources: Vec<Source>,
    pub condition: Option<Expr>,
    pub group_by: GroupBy,
    pub fill: Fill,
    pub descending: bool,
    pub limit: Option<usize>,
    pub offset: usize,
    pub series_limit: Option<usize>,
    pub series_offset: usize,
    pub time_zone: Option<chrono_tz::Tz>,
}

/// One output column of a `SELECT`.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectField {
    pub expr: FieldExpr,
    pub alias: Option<String>,
}

/// What a select column computes.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldExpr {
    /// `*`: every field and tag.
    Wildcard,
    /// A field or tag, optionally cast with `::field` or `::tag`.
    Ref(VarRef),
    /// A function call such as `mean(x)` or `derivative(mean(x), 1s)`.
    Call(Call),
}

/// A reference to a field or tag key.
#[derive(Clone, Debug, PartialEq)]
pub struct VarRef {
    pub name: String,
    pub kind: Option<RefKind>,
}

/// An explicit `::field` or `::tag` cast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    Field,
    Tag,
}

/// A function call with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub function: Function,
    /// The field or the nested aggregate the function reads.
    pub input: CallInput,
    /// The `N` of `percentile(x, N)`.
    pub percentile: Option<f64>,
    /// The unit of `derivative(x, unit)` in nanoseconds.
    pub unit: Option<i64>,
}

/// What a function call reads.
#[derive(Clone, Debug, PartialEq)]
pub enum CallInput {
    Field(VarRef),
    Call(Box<Call>),
}

/// Supported functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Function {
    Mean,
    Median,
    Min,
    Max,
    First,
    Last,
    Sum,
    Count,
    Spread,
    Percentile,
    Difference,
    Derivative,
    NonNegativeDerivative,
}

impl Function {
    pub fn from_name(name: &str) -> Option<Function> {
        Some(match name.to_ascii_lowercase().as_str() {
            "mean" => Function::Mean,
            "median" => Function::Median,
            "min" => Function::Min,
            "max" => Function::Max,
            "first" => Function::First,
            "last" => Function::Last,
            "sum" => Function::Sum,
            "count" => Function::Count,
            "spread" => Function::Spread,
            "percentile" => Function::Percentile,
            "difference" => Function::Difference,
            "derivative" => Function::Derivative,
            "non_negative_derivative" => Function::NonNegativeDerivative,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Function::Mean => "mean",
            Function::Median => "median",
            Function::Min => "min",
            Function::Max => "max",
            Function::First => "first",
            Function::Last => "last",
            Function::Sum => "sum",
            Function::Count => "count",
            Function::Spread => "spread",
            Function::Percentile => "percentile",
            Function::Difference => "difference",
            Function::Derivative => "derivative",
            Function::NonNegativeDerivative => "non_negative_derivative",
        }
    }

    /// Whether the function maps a sequence of values to a sequence of differences.
    pub fn is_transform(self) -> bool {
        matches!(
            self,
            Function::Difference | Function::Derivative | Function::NonNegativeDerivative
        )
    }

    /// Whether the function returns one of its input points, with that point's time.
    pub fn is_selector(self) -> bool {
        matches!(
            self,
            Function::Min | Function::Max | Function::First | Function::Last | Function::Percentile
        )
    }
}

/// `GROUP BY` dimensions.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GroupBy {
    /// `time(interval[, offset])`, both in nanoseconds.
    pub time: Option<(i64, i64)>,
    pub tags: Vec<TagDimension>,
}

/// A tag dimension of `GROUP BY`.
#[derive(Clone, Debug, PartialEq)]
pub enum TagDimension {
    Name(String),
    Regex(Regex),
    Wildcard,
}

/// How empty `GROUP BY time()` windows are filled.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Fill {
    #[default]
    Null,
    None,
    Previous,
    Linear,
    Number(f64),
}

/// A `WHERE` expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare {
        left: Operand,
        op: CompareOp,
        right: Operand,
    },
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    Regex,
    NotRegex,
}

impl CompareOp {
    /// The operator with its sides swapped, so `5 < x` reads as `x > 5`.
    pub fn flipped(self) -> CompareOp {
        match self {
            CompareOp::Lt => CompareOp::Gt,
            CompareOp::LtEq => CompareOp::GtEq,
            CompareOp::Gt => CompareOp::Lt,
            CompareOp::GtEq => CompareOp::LtEq,
            other => other,
        }
    }
}

/// One side of a comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Var(VarRef),
    /// The `time` pseudo-column.
    Time,
    Str(String),
    Number(f64),
    Bool(bool),
    Regex(Regex),
    /// A time expression in nanoseconds since the epoch, such as `now() - 1h`, already
    /// resolved against the query's `now`.
    TimeValue(i64),
    /// A bare duration literal in nanoseconds.
    Duration(i64),
}
