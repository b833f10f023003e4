//! Recursive-descent parser from tokens to [`Statement`]s.
//!
//! Error messages follow InfluxDB 1.x (`found X, expected Y at line L, char C`), so clients
//! that show them to users point at the same place InfluxDB would.

use super::ParseError;
use super::ast::{
    Call, CallInput, CompareOp, Expr, FieldExpr, Fill, Function, GroupBy, KeyMatch,
    MeasurementMatch, Operand, RefKind, Regex, SelectField, SelectStatement, ShowMeasurements,
    ShowTagValues, ShowTags, Source, Statement, TagDimension, VarRef,
};
use super::lexer::{Spanned, Symbol, Token, tokenize};
use super::time::parse_time_string;

/// Deepest nesting of parentheses in a condition. Evaluation recurses over the condition
/// tree, so an unbounded depth could overflow a worker's stack.
const MAX_CONDITION_DEPTH: usize = 64;
/// Most comparisons in one statement's conditions, which bounds chains of AND and OR.
const MAX_COMPARISONS: usize = 1_000;

/// Parses every `;`-separated statement of a query. `now_ns` resolves `now()`.
pub fn parse_query(query: &str, now_ns: i64) -> Result<Vec<Statement>, ParseError> {
    let tokens = tokenize(query)?;
    let mut parser = Parser {
        src: query,
        tokens,
        pos: 0,
        now_ns,
        depth: 0,
        comparisons: 0,
    };
    let mut statements = Vec::new();
    loop {
        while parser.eat_symbol(Symbol::Semicolon) {}
        if parser.peek() == &Token::Eof {
            break;
        }
        statements.push(parser.statement()?);
        if !parser.eat_symbol(Symbol::Semicolon) && parser.peek() != &Token::Eof {
            return Err(parser.unexpected("; or EOF"));
        }
    }
    if statements.is_empty() {
        return Err(parser.unexpected("SELECT or SHOW"));
    }
    Ok(statements)
}

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Spanned>,
    pos: usize,
    now_ns: i64,
    /// Parentheses open around the condition being parsed.
    depth: usize,
    /// Comparisons parsed so far in the query.
    comparisons: usize,
}

impl Parser<'_> {
    fn current(&self) -> &Spanned {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek(&self) -> &Token {
        &self.current().token
    }

    fn peek_at(&self, ahead: usize) -> &Token {
        let index = (self.pos + ahead).min(self.tokens.len() - 1);
        &self.tokens[index].token
    }

    fn offset(&self) -> usize {
        self.current().offset
    }

    /// Returns the current token and moves past it. The position may move past the final
    /// EOF token, which `peek` keeps returning, so stepping back with `pos -= 1` after an
    /// unexpected token always lands on that token.
    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        self.pos += 1;
        token
    }

    fn error_here(&self, message: impl Into<String>) -> ParseError {
        ParseError::at(self.src, self.offset(), message)
    }

    fn unexpected(&self, expected: &str) -> ParseError {
        self.error_here(format!("found {}, expected {expected}", self.peek()))
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Token::Ident(word) if word.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.is_keyword(keyword);
        if found {
            self.advance();
        }
        found
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), ParseError> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            Err(self.unexpected(keyword))
        }
    }

    fn eat_symbol(&mut self, symbol: Symbol) -> bool {
        let found = self.peek() == &Token::Symbol(symbol);
        if found {
            self.advance();
        }
        found
    }

    fn expect_symbol(&mut self, symbol: Symbol, text: &str) -> Result<(), ParseError> {
        if self.eat_symbol(symbol) {
            Ok(())
        } else {
            Err(self.unexpected(text))
        }
    }

    fn identifier(&mut self) -> Result<String, ParseError> {
        match self.peek().clone() {
            Token::Ident(name) | Token::QuotedIdent(name) => {
                self.advance();
                Ok(name)
            }
            _ => Err(self.unexpected("identifier")),
        }
    }

    fn regex(&mut self) -> Result<Regex, ParseError> {
        let offset = self.offset();
        let Token::Regex(pattern) = self.advance() else {
            self.pos -= 1;
            return Err(self.unexpected("regex"));
        };
        compile_regex(self.src, offset, &pattern)
    }

    fn unsigned(&mut self, what: &str) -> Result<usize, ParseError> {
        match self.peek() {
            Token::Integer(n) if *n >= 0 => {
                let n = usize::try_from(*n).unwrap_or(usize::MAX);
                self.advance();
                Ok(n)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn statement(&mut self) -> Result<Statement, ParseError> {
        if self.eat_keyword("SELECT") {
            return self.select().map(|s| Statement::Select(Box::new(s)));
        }
        if self.eat_keyword("SHOW") {
            return self.show();
        }
        Err(self.unexpected("SELECT, SHOW"))
    }

    fn show(&mut self) -> Result<Statement, ParseError> {
        if self.eat_keyword("DATABASES") {
            return Ok(Statement::ShowDatabases);
        }
        if self.eat_keyword("RETENTION") {
            self.expect_keyword("POLICIES")?;
            let database = self.on_database()?;
            return Ok(Statement::ShowRetentionPolicies { database });
        }
        if self.eat_keyword("MEASUREMENTS") {
            return self.show_measurements().map(Statement::ShowMeasurements);
        }
        if self.eat_keyword("SERIES") {
            return self.show_tags_tail(false).map(Statement::ShowSeries);
        }
        if self.eat_keyword("FIELD") {
            self.expect_keyword("KEYS")?;
            return self.show_tags_tail(false).map(Statement::ShowFieldKeys);
        }
        if self.eat_keyword("TAG") {
            if self.eat_keyword("KEYS") {
                return self.show_tags_tail(false).map(Statement::ShowTagKeys);
            }
            self.expect_keyword("VALUES")?;
            return self.show_tag_values();
        }
        Err(self.unexpected("DATABASES, MEASUREMENTS, RETENTION, SERIES, FIELD, TAG"))
    }

    fn on_database(&mut self) -> Result<Option<String>, ParseError> {
        if self.eat_keyword("ON") {
            self.identifier().map(Some)
        } else {
            Ok(None)
        }
    }

    fn show_measurements(&mut self) -> Result<ShowMeasurements, ParseError> {
        let mut show = ShowMeasurements {
            database: self.on_database()?,
            ..Default::default()
        };
        if self.eat_keyword("WITH") {
            self.expect_keyword("MEASUREMENT")?;
            show.with_measurement = Some(if self.eat_symbol(Symbol::EqRegex) {
                MeasurementMatch::Regex(self.regex()?)
            } else {
                self.expect_symbol(Symbol::Eq, "=, =~")?;
                MeasurementMatch::Name(self.identifier()?)
            });
        }
        show.condition = self.where_clause()?;
        (show.limit, show.offset) = self.limit_offset()?;
        Ok(show)
    }

    /// Parses `[ON db] [FROM sources] [WITH KEY ...] [WHERE] [LIMIT] [OFFSET]`; `WITH KEY`
    /// is read by the caller when `stop_at_with` is set.
    fn show_tags_tail(&mut self, stop_at_with: bool) -> Result<ShowTags, ParseError> {
        let mut show = ShowTags {
            database: self.on_database()?,
            ..Default::default()
        };
        if self.eat_keyword("FROM") {
            show.sources = self.sources()?;
        }
        if stop_at_with {
            return Ok(show);
        }
        show.condition = self.where_clause()?;
        (show.limit, show.offset) = self.limit_offset()?;
        Ok(show)
    }

    fn show_tag_values(&mut self) -> Result<Statement, ParseError> {
        let mut show = self.show_tags_tail(true)?;
        self.expect_keyword("WITH")?;
        self.expect_keyword("KEY")?;
        let key = match self.advance() {
            Token::Symbol(Symbol::Eq) => KeyMatch::Eq(self.identifier()?),
            Token::Symbol(Symbol::NotEq) => KeyMatch::NotEq(self.identifier()?),
            Token::Symbol(Symbol::EqRegex) => KeyMatch::Regex(self.regex()?),
            Token::Symbol(Symbol::NotEqRegex) => KeyMatch::NotRegex(self.regex()?),
            Token::Ident(word) if word.eq_ignore_ascii_case("IN") => {
                self.expect_symbol(Symbol::LParen, "(")?;
                let mut keys = vec![self.identifier()?];
                while self.eat_symbol(Symbol::Comma) {
                    keys.push(self.identifier()?);
                }
                self.expect_symbol(Symbol::RParen, ")")?;
                KeyMatch::In(keys)
            }
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("=, !=, =~, !~, IN"));
            }
        };
        show.condition = self.where_clause()?;
        (show.limit, show.offset) = self.limit_offset()?;
        Ok(Statement::ShowTagValues(ShowTagValues { show, key }))
    }

    fn limit_offset(&mut self) -> Result<(Option<usize>, usize), ParseError> {
        let mut limit = None;
        let mut offset = 0;
        if self.eat_keyword("LIMIT") {
            limit = Some(self.unsigned("integer")?);
        }
        if self.eat_keyword("OFFSET") {
            offset = self.unsigned("integer")?;
        }
        Ok((limit, offset))
    }

    fn where_clause(&mut self) -> Result<Option<Expr>, ParseError> {
        if self.eat_keyword("WHERE") {
            self.or_expr().map(Some)
        } else {
            Ok(None)
        }
    }

    fn select(&mut self) -> Result<SelectStatement, ParseError> {
        let mut fields = vec![self.select_field()?];
        while self.eat_symbol(Symbol::Comma) {
            fields.push(self.select_field()?);
        }
        self.expect_keyword("FROM")?;
        let sources = self.sources()?;
        let condition = self.where_clause()?;
        let mut select = SelectStatement {
            fields,
            sources,
            condition,
            group_by: GroupBy::default(),
            fill: Fill::Null,
            descending: false,
            limit: None,
            offset: 0,
            series_limit: None,
            series_offset: 0,
            time_zone: None,
        };
        if self.eat_keyword("GROUP") {
            self.expect_keyword("BY")?;
            select.group_by = self.group_by()?;
        }
        self.select_tail(&mut select)?;
        Ok(select)
    }

    /// Parses `fill()`, `ORDER BY`, `LIMIT`, `OFFSET`, `SLIMIT`, `SOFFSET` and `tz()`. They
    /// are accepted in any order, which is more lenient than InfluxDB.
    fn select_tail(&mut self, select: &mut SelectStatement) -> Result<(), ParseError> {
        loop {
            if self.eat_keyword("FILL") {
                select.fill = self.fill()?;
            } else if self.eat_keyword("ORDER") {
                self.expect_keyword("BY")?;
                select.descending = self.order_by()?;
            } else if self.eat_keyword("LIMIT") {
                select.limit = Some(self.unsigned("integer")?);
            } else if self.eat_keyword("OFFSET") {
                select.offset = self.unsigned("integer")?;
            } else if self.eat_keyword("SLIMIT") {
                select.series_limit = Some(self.unsigned("integer")?);
            } else if self.eat_keyword("SOFFSET") {
                select.series_offset = self.unsigned("integer")?;
            } else if self.eat_keyword("TZ") {
                select.time_zone = Some(self.time_zone()?);
            } else {
                return Ok(());
            }
        }
    }

    fn order_by(&mut self) -> Result<bool, ParseError> {
        if !self.is_keyword("time") {
            return Err(self.error_here("only ORDER BY time supported at this time"));
        }
        self.advance();
        if self.eat_keyword("DESC") {
            return Ok(true);
        }
        self.eat_keyword("ASC");
        Ok(false)
    }

    fn time_zone(&mut self) -> Result<chrono_tz::Tz, ParseError> {
        self.expect_symbol(Symbol::LParen, "(")?;
        let offset = self.offset();
        let Token::Str(name) = self.advance() else {
            self.pos -= 1;
            return Err(self.unexpected("string"));
        };
        let tz = name.parse::<chrono_tz::Tz>().map_err(|_| {
            ParseError::at(self.src, offset, format!("unable to find time zone {name}"))
        })?;
        self.expect_symbol(Symbol::RParen, ")")?;
        Ok(tz)
    }

    fn fill(&mut self) -> Result<Fill, ParseError> {
        self.expect_symbol(Symbol::LParen, "(")?;
        let negative = self.eat_symbol(Symbol::Minus);
        let sign = if negative { -1.0 } else { 1.0 };
        let fill = match self.advance() {
            Token::Integer(n) => Fill::Number(sign * n as f64),
            Token::Float(n) => Fill::Number(sign * n),
            Token::Ident(word) if !negative => match word.to_ascii_lowercase().as_str() {
                "null" => Fill::Null,
                "none" => Fill::None,
                "previous" => Fill::Previous,
                "linear" => Fill::Linear,
                _ => {
                    self.pos -= 1;
                    return Err(self.unexpected("null, none, previous, linear, number"));
                }
            },
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("null, none, previous, linear, number"));
            }
        };
        self.expect_symbol(Symbol::RParen, ")")?;
        Ok(fill)
    }

    fn group_by(&mut self) -> Result<GroupBy, ParseError> {
        let mut group_by = GroupBy::default();
        loop {
            if self.is_keyword("time") && self.peek_at(1) == &Token::Symbol(Symbol::LParen) {
                if group_by.time.is_some() {
                    return Err(self.error_here("multiple time dimensions not allowed"));
                }
                self.advance();
                group_by.time = Some(self.time_dimension()?);
            } else if self.eat_symbol(Symbol::Mul) {
                group_by.tags.push(TagDimension::Wildcard);
            } else if matches!(self.peek(), Token::Regex(_)) {
                group_by.tags.push(TagDimension::Regex(self.regex()?));
            } else {
                let name = self.identifier()?;
                group_by.tags.push(TagDimension::Name(name));
            }
            if !self.eat_symbol(Symbol::Comma) {
                return Ok(group_by);
            }
        }
    }

    fn time_dimension(&mut self) -> Result<(i64, i64), ParseError> {
        self.expect_symbol(Symbol::LParen, "(")?;
        let offset = self.offset();
        let Token::Duration(interval) = self.advance() else {
            self.pos -= 1;
            return Err(self.unexpected("duration"));
        };
        if interval <= 0 {
            return Err(ParseError::at(
                self.src,
                offset,
                "time dimension must have a positive duration",
            ));
        }
        let mut shift = 0;
        if self.eat_symbol(Symbol::Comma) {
            let negative = self.eat_symbol(Symbol::Minus);
            let Token::Duration(d) = self.advance() else {
                self.pos -= 1;
                return Err(self.unexpected("duration"));
            };
            shift = if negative { -d } else { d };
        }
        self.expect_symbol(Symbol::RParen, ")")?;
        Ok((interval, shift))
    }

    fn sources(&mut self) -> Result<Vec<Source>, ParseError> {
        let mut sources = vec![self.source()?];
        while self.eat_symbol(Symbol::Comma) {
            sources.push(self.source()?);
        }
        Ok(sources)
    }

    /// Parses `m`, `rp.m`, `db.rp.m` or `db..m`, where the last part may be a regex.
    fn source(&mut self) -> Result<Source, ParseError> {
        let mut parts: Vec<Option<String>> = Vec::new();
        loop {
            if matches!(self.peek(), Token::Regex(_)) {
                let regex = self.regex()?;
                return self.finish_source(parts, MeasurementMatch::Regex(regex));
            }
            let part = match self.peek() {
                Token::Ident(_) | Token::QuotedIdent(_) => Some(self.identifier()?),
                Token::Symbol(Symbol::Dot) if !parts.is_empty() => None,
                _ => return Err(self.unexpected("identifier, regex")),
            };
            if !self.eat_symbol(Symbol::Dot) {
                let Some(name) = part else {
                    return Err(self.unexpected("identifier, regex"));
                };
                return self.finish_source(parts, MeasurementMatch::Name(name));
            }
            parts.push(part);
            if parts.len() > 2 {
                return Err(self.unexpected("identifier, regex"));
            }
        }
    }

    fn finish_source(
        &self,
        mut parts: Vec<Option<String>>,
        measurement: MeasurementMatch,
    ) -> Result<Source, ParseError> {
        let retention_policy = parts.pop().flatten();
        let database = parts.pop().flatten();
        Ok(Source {
            database,
            retention_policy,
            measurement,
        })
    }

    fn select_field(&mut self) -> Result<SelectField, ParseError> {
        let expr = if self.eat_symbol(Symbol::Mul) {
            FieldExpr::Wildcard
        } else if matches!(self.peek(), Token::Ident(_))
            && self.peek_at(1) == &Token::Symbol(Symbol::LParen)
        {
            FieldExpr::Call(self.call()?)
        } else {
            FieldExpr::Ref(self.var_ref()?)
        };
        let alias = if self.eat_keyword("AS") {
            Some(self.identifier()?)
        } else {
            None
        };
        Ok(SelectField { expr, alias })
    }

    fn var_ref(&mut self) -> Result<VarRef, ParseError> {
        let name = self.identifier()?;
        let mut kind = None;
        if self.eat_symbol(Symbol::DoubleColon) {
            let offset = self.offset();
            let cast = self.identifier()?;
            kind = Some(match cast.to_ascii_lowercase().as_str() {
                "field" => RefKind::Field,
                "tag" => RefKind::Tag,
                // Type casts such as ::float change nothing, because every stored value
                // is a float or a boolean already.
                "float" | "integer" | "string" | "boolean" => RefKind::Field,
                _ => {
                    return Err(ParseError::at(
                        self.src,
                        offset,
                        format!(
                            "found {cast}, expected field, tag, float, integer, string, boolean"
                        ),
                    ));
                }
            });
        }
        Ok(VarRef { name, kind })
    }

    fn call(&mut self) -> Result<Call, ParseError> {
        let offset = self.offset();
        let name = self.identifier()?;
        let Some(function) = Function::from_name(&name) else {
            return Err(ParseError::at(
                self.src,
                offset,
                format!("undefined function {name}()"),
            ));
        };
        self.expect_symbol(Symbol::LParen, "(")?;
        let input = if matches!(self.peek(), Token::Ident(_))
            && self.peek_at(1) == &Token::Symbol(Symbol::LParen)
        {
            CallInput::Call(Box::new(self.call()?))
        } else if self.peek() == &Token::Symbol(Symbol::Mul) {
            return Err(self.error_here(format!("{name}(*) is not supported; name a field")));
        } else {
            CallInput::Field(self.var_ref()?)
        };
        let mut call = Call {
            function,
            input,
            percentile: None,
            unit: None,
        };
        self.call_arguments(&mut call, &name)?;
        self.expect_symbol(Symbol::RParen, ")")?;
        check_call(self.src, offset, &call, &name)?;
        Ok(call)
    }

    fn call_arguments(&mut self, call: &mut Call, name: &str) -> Result<(), ParseError> {
        match call.function {
            Function::Percentile => {
                self.expect_symbol(Symbol::Comma, ",")?;
                call.percentile = Some(match self.advance() {
                    Token::Integer(n) => n as f64,
                    Token::Float(n) => n,
                    _ => {
                        self.pos -= 1;
                        return Err(self.unexpected("number"));
                    }
                });
            }
            Function::Derivative | Function::NonNegativeDerivative => {
                if self.eat_symbol(Symbol::Comma) {
                    let Token::Duration(unit) = self.advance() else {
                        self.pos -= 1;
                        return Err(self.unexpected("duration"));
                    };
                    call.unit = Some(unit);
                }
            }
            _ => {
                if self.peek() == &Token::Symbol(Symbol::Comma) {
                    return Err(self.error_here(format!("invalid number of arguments for {name}")));
                }
            }
        }
        Ok(())
    }

    fn or_expr(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.and_expr()?;
        while self.eat_keyword("OR") {
            let right = self.and_expr()?;
            expr = Expr::Or(Box::new(expr), Box::new(right));
        }
        Ok(expr)
    }

    fn and_expr(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.unary_expr()?;
        while self.eat_keyword("AND") {
            let right = self.unary_expr()?;
            expr = Expr::And(Box::new(expr), Box::new(right));
        }
        Ok(expr)
    }

    fn unary_expr(&mut self) -> Result<Expr, ParseError> {
        if self.eat_symbol(Symbol::LParen) {
            if self.depth >= MAX_CONDITION_DEPTH {
                return Err(self.error_here(format!(
                    "conditions are nested deeper than {MAX_CONDITION_DEPTH} parentheses; simplify the WHERE clause"
                )));
            }
            self.depth += 1;
            let expr = self.or_expr();
            self.depth -= 1;
            let expr = expr?;
            self.expect_symbol(Symbol::RParen, ")")?;
            return Ok(expr);
        }
        self.comparisons += 1;
        if self.comparisons > MAX_COMPARISONS {
            return Err(self.error_here(format!(
                "more than {MAX_COMPARISONS} comparisons in the query; split it or use a regular expression"
            )));
        }
        let left = self.operand()?;
        let op = match self.advance() {
            Token::Symbol(Symbol::Eq) => CompareOp::Eq,
            Token::Symbol(Symbol::NotEq) => CompareOp::NotEq,
            Token::Symbol(Symbol::Lt) => CompareOp::Lt,
            Token::Symbol(Symbol::LtEq) => CompareOp::LtEq,
            Token::Symbol(Symbol::Gt) => CompareOp::Gt,
            Token::Symbol(Symbol::GtEq) => CompareOp::GtEq,
            Token::Symbol(Symbol::EqRegex) => CompareOp::Regex,
            Token::Symbol(Symbol::NotEqRegex) => CompareOp::NotRegex,
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("=, !=, <, <=, >, >=, =~, !~"));
            }
        };
        let right = self.operand()?;
        Ok(Expr::Compare { left, op, right })
    }

    /// Parses a primary operand followed by `+` or `-` terms, folding time arithmetic such
    /// as `now() - 1h` into one value.
    fn operand(&mut self) -> Result<Operand, ParseError> {
        let mut value = self.primary()?;
        loop {
            let negative = if self.eat_symbol(Symbol::Minus) {
                true
            } else if self.eat_symbol(Symbol::Plus) {
                false
            } else {
                return Ok(value);
            };
            let offset = self.offset();
            let right = self.primary()?;
            value = combine_time(self.src, offset, &value, &right, negative)?;
        }
    }

    fn primary(&mut self) -> Result<Operand, ParseError> {
        let offset = self.offset();
        let negative = self.eat_symbol(Symbol::Minus);
        let sign = if negative { -1 } else { 1 };
        match self.advance() {
            Token::Integer(n) => Ok(Operand::Number((sign * n) as f64)),
            Token::Float(n) => Ok(Operand::Number(sign as f64 * n)),
            Token::Duration(d) => Ok(Operand::Duration(sign * d)),
            _ if negative => {
                self.pos -= 1;
                Err(self.unexpected("number, duration"))
            }
            Token::Str(s) => Ok(Operand::Str(s)),
            Token::Regex(pattern) => compile_regex(self.src, offset, &pattern).map(Operand::Regex),
            Token::Ident(word) if word.eq_ignore_ascii_case("now") => {
                self.expect_symbol(Symbol::LParen, "(")?;
                self.expect_symbol(Symbol::RParen, ")")?;
                Ok(Operand::TimeValue(self.now_ns))
            }
            Token::Ident(word) if word.eq_ignore_ascii_case("true") => Ok(Operand::Bool(true)),
            Token::Ident(word) if word.eq_ignore_ascii_case("false") => Ok(Operand::Bool(false)),
            Token::Ident(word) if word.eq_ignore_ascii_case("time") => Ok(Operand::Time),
            Token::Ident(_) | Token::QuotedIdent(_) => {
                self.pos -= 1;
                self.var_ref().map(Operand::Var)
            }
            _ => {
                self.pos -= 1;
                Err(self.unexpected("identifier, string, number, bool"))
            }
        }
    }
}

fn compile_regex(src: &str, offset: usize, pattern: &str) -> Result<Regex, ParseError> {
    regex::Regex::new(pattern)
        .map(Regex)
        .map_err(|e| ParseError::at(src, offset, format!("invalid regex /{pattern}/: {e}")))
}

/// Checks nesting rules: transforms take a field or an aggregate, aggregates take a field.
fn check_call(src: &str, offset: usize, call: &Call, name: &str) -> Result<(), ParseError> {
    match (&call.input, call.function.is_transform()) {
        (CallInput::Call(inner), true) if inner.function.is_transform() => Err(ParseError::at(
            src,
            offset,
            format!("{name}() cannot take another transform as its argument"),
        )),
        (CallInput::Call(_), false) => Err(ParseError::at(
            src,
            offset,
            format!("{name}() takes a field, not a function call"),
        )),
        _ => Ok(()),
    }
}

/// Resolves `left ± right` for time arithmetic; the result is a time if either side is one.
fn combine_time(
    src: &str,
    offset: usize,
    left: &Operand,
    right: &Operand,
    negative: bool,
) -> Result<Operand, ParseError> {
    let as_ns = |operand: &Operand| -> Option<(i64, bool)> {
        match operand {
            Operand::TimeValue(t) => Some((*t, true)),
            Operand::Str(s) => parse_time_string(s).map(|t| (t, true)),
            Operand::Duration(d) => Some((*d, false)),
            Operand::Number(n) if n.fract() == 0.0 => Some((*n as i64, false)),
            _ => None,
        }
    };
    let (Some((l, l_time)), Some((r, r_time))) = (as_ns(left), as_ns(right)) else {
        return Err(ParseError::at(
            src,
            offset,
            "arithmetic is supported only on time values and durations",
        ));
    };
    let value = if negative {
        l.checked_sub(r)
    } else {
        l.checked_add(r)
    };
    let value = value.ok_or_else(|| ParseError::at(src, offset, "time arithmetic overflows"))?;
    Ok(match (l_time || r_time, left, right) {
        (true, _, _) => Operand::TimeValue(value),
        (false, Operand::Duration(_), _) | (false, _, Operand::Duration(_)) => {
            Operand::Duration(value)
        }
        _ => Operand::Number(value as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000_000;

    fn select(query: &str) -> SelectStatement {
        match parse_query(query, NOW).expect("query parses").remove(0) {
            Statement::Select(select) => *select,
            other => panic!("expected SELECT, parsed {other:?}"),
        }
    }

    #[test]
    fn deep_nesting_rejected_not_overflowed() {
        let deep = format!(
            "SELECT x FROM m WHERE {}a = 'b'{}",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        let error = parse_query(&deep, NOW).unwrap_err();
        assert!(error.to_string().contains("nested deeper"), "{error}");
        let ok = format!(
            "SELECT x FROM m WHERE {}a = 'b'{}",
            "(".repeat(60),
            ")".repeat(60)
        );
        assert!(parse_query(&ok, NOW).is_ok());
    }

    #[test]
    fn long_or_chain_rejected() {
        let chain = vec!["a = 'b'"; 5_000].join(" OR ");
        let error = parse_query(&format!("SELECT x FROM m WHERE {chain}"), NOW).unwrap_err();
        assert!(error.to_string().contains("comparisons"), "{error}");
    }

    #[test]
    fn quoted_database_rp_measurement() {
        let s = select(r#"SELECT "gas_lel" FROM "stonelion"."autogen"."gas-detector""#);
        assert_eq!(s.sources[0].database.as_deref(), Some("stonelion"));
        assert_eq!(s.sources[0].retention_policy.as_deref(), Some("autogen"));
        assert_eq!(
            s.sources[0].measurement,
            MeasurementMatch::Name("gas-detector".into())
        );
    }

    #[test]
    fn database_with_empty_rp() {
        let s = select(r#"SELECT x FROM "db".."m""#);
        assert_eq!(s.sources[0].database.as_deref(), Some("db"));
        assert_eq!(s.sources[0].retention_policy, None);
    }

    #[test]
    fn regex_source_and_tag_condition() {
        let s = select(r"SELECT x FROM /^gas-.*/ WHERE site =~ /^plant\ a$/");
        let MeasurementMatch::Regex(re) = &s.sources[0].measurement else {
            panic!("expected a regex source");
        };
        assert!(re.0.is_match("gas-detector"));
        let Some(Expr::Compare {
            right: Operand::Regex(re),
            ..
        }) = &s.condition
        else {
            panic!("expected a regex comparison");
        };
        assert!(re.0.is_match("plant a"));
    }

    #[test]
    fn now_minus_duration_folds() {
        let s = select("SELECT x FROM m WHERE time > now() - 1h");
        let Some(Expr::Compare { right, .. }) = s.condition else {
            panic!("expected a comparison");
        };
        assert_eq!(right, Operand::TimeValue(NOW - 3_600_000_000_000));
    }

    #[test]
    fn group_by_time_offset_fill_tz() {
        let s = select(
            "select mean(x) from m group by time(5m, -1m), \"device\" fill(linear) \
             order by time desc limit 10 slimit 2 tz('Asia/Shanghai')",
        );
        assert_eq!(s.group_by.time, Some((300_000_000_000, -60_000_000_000)));
        assert_eq!(s.group_by.tags, vec![TagDimension::Name("device".into())]);
        assert_eq!(s.fill, Fill::Linear);
        assert!(s.descending);
        assert_eq!(s.limit, Some(10));
        assert_eq!(s.series_limit, Some(2));
        assert_eq!(s.time_zone, Some(chrono_tz::Asia::Shanghai));
    }

    #[test]
    fn nested_derivative_with_unit() {
        let s = select("SELECT non_negative_derivative(max(energy_kwh), 1h) AS rate FROM m");
        let FieldExpr::Call(call) = &s.fields[0].expr else {
            panic!("expected a call");
        };
        assert_eq!(call.function, Function::NonNegativeDerivative);
        assert_eq!(call.unit, Some(3_600_000_000_000));
        assert!(matches!(&call.input, CallInput::Call(inner) if inner.function == Function::Max));
        assert_eq!(s.fields[0].alias.as_deref(), Some("rate"));
    }

    #[test]
    fn multiple_statements() {
        let statements = parse_query("SHOW DATABASES; SHOW MEASUREMENTS;", NOW).expect("parses");
        assert_eq!(statements.len(), 2);
    }

    #[test]
    fn tag_values_with_key_in() {
        let statements = parse_query(
            r#"SHOW TAG VALUES FROM "m" WITH KEY IN ("site", "device") LIMIT 5"#,
            NOW,
        )
        .expect("parses");
        let Statement::ShowTagValues(show) = &statements[0] else {
            panic!("expected SHOW TAG VALUES");
        };
        assert_eq!(show.key, KeyMatch::In(vec!["site".into(), "device".into()]));
        assert_eq!(show.show.limit, Some(5));
    }

    #[test]
    fn error_points_at_token() {
        let err = parse_query("SELECT mean(x) FORM m", NOW).expect_err("typo");
        assert_eq!(
            err.to_string(),
            "found FORM, expected FROM at line 1, char 16"
        );
    }

    #[test]
    fn error_on_second_line() {
        let err = parse_query("SELECT x\nFROM m WHERE", NOW).expect_err("missing condition");
        assert_eq!((err.line, err.char), (2, 13));
    }

    #[test]
    fn unknown_function_rejected() {
        let err = parse_query("SELECT stddevx(x) FROM m", NOW).expect_err("unknown function");
        assert!(
            err.message.contains("undefined function stddevx()"),
            "{}",
            err.message
        );
    }

    #[test]
    fn aggregate_of_aggregate_rejected() {
        assert!(parse_query("SELECT mean(max(x)) FROM m", NOW).is_err());
    }

    #[test]
    fn invalid_regex_rejected() {
        let err = parse_query("SELECT x FROM m WHERE a =~ /(/", NOW).expect_err("bad regex");
        assert!(err.message.starts_with("invalid regex"), "{}", err.message);
    }
}
