//! Tokenizer for InfluxQL, with the byte offset of every token so parse errors can point at
//! the place in the query.

use std::fmt;

use super::ParseError;

/// One token of a query.
#[derive(Clone, Debug, PartialEq)]
pub enum Token {
    /// An unquoted identifier or keyword, as written.
    Ident(String),
    /// A double-quoted identifier, unescaped.
    QuotedIdent(String),
    /// A single-quoted string, unescaped.
    Str(String),
    /// An integer literal.
    Integer(i64),
    /// A float literal.
    Float(f64),
    /// A duration literal in nanoseconds, such as `5m` or `1h30m`.
    Duration(i64),
    /// A regex literal between slashes, with `\/` unescaped to `/`.
    Regex(String),
    Symbol(Symbol),
    Eof,
}

/// Operators and punctuation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Symbol {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    EqRegex,
    NotEqRegex,
    Plus,
    Minus,
    Mul,
    LParen,
    RParen,
    Comma,
    Dot,
    Semicolon,
    DoubleColon,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(s) => f.write_str(s),
            Token::QuotedIdent(s) => write!(f, "\"{s}\""),
            Token::Str(s) => write!(f, "'{s}'"),
            Token::Integer(n) => write!(f, "{n}"),
            Token::Float(n) => write!(f, "{n}"),
            Token::Duration(_) => f.write_str("DURATION"),
            Token::Regex(r) => write!(f, "/{r}/"),
            Token::Symbol(s) => f.write_str(symbol_text(*s)),
            Token::Eof => f.write_str("EOF"),
        }
    }
}

fn symbol_text(symbol: Symbol) -> &'static str {
    match symbol {
        Symbol::Eq => "=",
        Symbol::NotEq => "!=",
        Symbol::Lt => "<",
        Symbol::LtEq => "<=",
        Symbol::Gt => ">",
        Symbol::GtEq => ">=",
        Symbol::EqRegex => "=~",
        Symbol::NotEqRegex => "!~",
        Symbol::Plus => "+",
        Symbol::Minus => "-",
        Symbol::Mul => "*",
        Symbol::LParen => "(",
        Symbol::RParen => ")",
        Symbol::Comma => ",",
        Symbol::Dot => ".",
        Symbol::Semicolon => ";",
        Symbol::DoubleColon => "::",
    }
}

/// A token and the byte offset where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Spanned {
    pub token: Token,
    pub offset: usize,
}

/// Splits a query into tokens, ending with [`Token::Eof`].
pub fn tokenize(query: &str) -> Result<Vec<Spanned>, ParseError> {
    let mut lexer = Lexer { src: query, pos: 0 };
    let mut tokens = Vec::new();
    loop {
        lexer.skip_whitespace_and_comments();
        let offset = lexer.pos;
        let token = lexer.next_token()?;
        let done = token == Token::Eof;
        tokens.push(Spanned { token, offset });
        if done {
            return Ok(tokens);
        }
    }
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.src[self.pos..].chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn error(&self, offset: usize, message: impl Into<String>) -> ParseError {
        ParseError::at(self.src, offset, message)
    }

    fn skip_whitespace_and_comments(&mut self) {
        loop {
            while self.peek().is_some_and(char::is_whitespace) {
                self.bump();
            }
            if self.src[self.pos..].starts_with("--") {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.bump();
                }
            } else if self.src[self.pos..].starts_with("/*") {
                match self.src[self.pos + 2..].find("*/") {
                    Some(end) => self.pos += end + 4,
                    None => self.pos = self.src.len(),
                }
            } else {
                return;
            }
        }
    }

    fn next_token(&mut self) -> Result<Token, ParseError> {
        let start = self.pos;
        let Some(c) = self.peek() else {
            return Ok(Token::Eof);
        };
        if c.is_ascii_digit()
            || (c == '.' && self.peek_second().is_some_and(|d| d.is_ascii_digit()))
        {
            return self.number(start);
        }
        if c.is_alphabetic() || c == '_' {
            return Ok(Token::Ident(self.identifier()));
        }
        match c {
            '"' => self.quoted(start, '"').map(Token::QuotedIdent),
            '\'' => self.quoted(start, '\'').map(Token::Str),
            '/' => self.regex(start),
            _ => self.symbol(start, c).map(Token::Symbol),
        }
    }

    fn identifier(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.bump();
        }
        self.src[start..self.pos].to_owned()
    }

    fn symbol(&mut self, start: usize, c: char) -> Result<Symbol, ParseError> {
        self.bump();
        let next = self.peek();
        let (symbol, two_chars) = match (c, next) {
            ('=', Some('~')) => (Symbol::EqRegex, true),
            ('=', _) => (Symbol::Eq, false),
            ('!', Some('=')) => (Symbol::NotEq, true),
            ('!', Some('~')) => (Symbol::NotEqRegex, true),
            ('<', Some('>')) => (Symbol::NotEq, true),
            ('<', Some('=')) => (Symbol::LtEq, true),
            ('<', _) => (Symbol::Lt, false),
            ('>', Some('=')) => (Symbol::GtEq, true),
            ('>', _) => (Symbol::Gt, false),
            (':', Some(':')) => (Symbol::DoubleColon, true),
            ('+', _) => (Symbol::Plus, false),
            ('-', _) => (Symbol::Minus, false),
            ('*', _) => (Symbol::Mul, false),
            ('(', _) => (Symbol::LParen, false),
            (')', _) => (Symbol::RParen, false),
            (',', _) => (Symbol::Comma, false),
            ('.', _) => (Symbol::Dot, false),
            (';', _) => (Symbol::Semicolon, false),
            _ => return Err(self.error(start, format!("found {c}, expected a token"))),
        };
        if two_chars {
            self.bump();
        }
        Ok(symbol)
    }

    /// Reads a quoted string or identifier, unescaping `\\`, `\n`, `\t` and the quote.
    fn quoted(&mut self, start: usize, quote: char) -> Result<String, ParseError> {
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(self.error(
                        start,
                        format!("found unterminated {quote}, expected {quote}"),
                    ));
                }
                Some('\\') => match self.bump() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('\\') => out.push('\\'),
                    Some(c) if c == quote => out.push(c),
                    Some(c) => {
                        return Err(
                            self.error(self.pos - c.len_utf8() - 1, format!("bad escape \\{c}"))
                        );
                    }
                    None => {
                        return Err(self.error(
                            start,
                            format!("found unterminated {quote}, expected {quote}"),
                        ));
                    }
                },
                Some(c) if c == quote => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    /// Reads `/.../`. Only `\/` is unescaped; every other escape is kept for the regex engine.
    fn regex(&mut self, start: usize) -> Result<Token, ParseError> {
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(self.error(start, "found unterminated regex, expected /"));
                }
                Some('\\') => match self.bump() {
                    Some('/') => out.push('/'),
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                    }
                    None => return Err(self.error(start, "found unterminated regex, expected /")),
                },
                Some('/') => return Ok(Token::Regex(out)),
                Some(c) => out.push(c),
            }
        }
    }

    /// Reads an integer, a float, or a duration such as `10s`, `1h30m` or `500ms`.
    fn number(&mut self, start: usize) -> Result<Token, ParseError> {
        self.digits();
        let mut is_float = false;
        if self.peek() == Some('.') && self.peek_second().is_some_and(|c| c.is_ascii_digit()) {
            is_float = true;
            self.bump();
            self.digits();
        }
        if !is_float && self.peek().is_some_and(duration_unit_start) {
            self.pos = start;
            return self.duration(start);
        }
        let text = &self.src[start..self.pos];
        if is_float {
            return text
                .parse::<f64>()
                .map(Token::Float)
                .map_err(|_| self.error(start, format!("unable to parse number {text}")));
        }
        match text.parse::<i64>() {
            Ok(n) => Ok(Token::Integer(n)),
            Err(_) => Err(self.error(start, format!("unable to parse integer {text}"))),
        }
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
    }

    fn duration(&mut self, start: usize) -> Result<Token, ParseError> {
        let mut total: i64 = 0;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            let digits_start = self.pos;
            self.digits();
            let amount: i64 = self.src[digits_start..self.pos]
                .parse()
                .map_err(|_| self.error(start, "duration is out of range"))?;
            let unit_start = self.pos;
            while self.peek().is_some_and(|c| c.is_alphabetic()) {
                self.bump();
            }
            let unit = &self.src[unit_start..self.pos];
            let Some(unit_ns) = duration_unit_nanos(unit) else {
                return Err(self.error(unit_start, format!("invalid duration unit {unit:?}")));
            };
            total = amount
                .checked_mul(unit_ns)
                .and_then(|ns| total.checked_add(ns))
                .ok_or_else(|| self.error(start, "duration is out of range"))?;
        }
        Ok(Token::Duration(total))
    }
}

fn duration_unit_start(c: char) -> bool {
    matches!(c, 'n' | 'u' | 'µ' | 'm' | 's' | 'h' | 'd' | 'w')
}

/// Nanoseconds in one unit of an InfluxQL duration literal.
pub fn duration_unit_nanos(unit: &str) -> Option<i64> {
    Some(match unit {
        "ns" => 1,
        "u" | "µ" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "d" => 86_400 * 1_000_000_000,
        "w" => 7 * 86_400 * 1_000_000_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(query: &str) -> Vec<Token> {
        tokenize(query)
            .expect("query tokenizes")
            .into_iter()
            .map(|s| s.token)
            .collect()
    }

    #[test]
    fn durations_combine_units() {
        assert_eq!(tokens("1h30m")[0], Token::Duration(5_400_000_000_000));
        assert_eq!(tokens("500ms")[0], Token::Duration(500_000_000));
        assert_eq!(tokens("2u")[0], Token::Duration(2_000));
        assert_eq!(tokens("1w")[0], Token::Duration(604_800_000_000_000));
    }

    #[test]
    fn quoted_identifier_unescapes_quote() {
        assert_eq!(
            tokens(r#""my \"m\"""#)[0],
            Token::QuotedIdent("my \"m\"".into())
        );
        assert_eq!(tokens(r"'it\'s'")[0], Token::Str("it's".into()));
    }

    #[test]
    fn regex_keeps_escapes_except_slash() {
        assert_eq!(tokens(r"/^a\.b\/c$/")[0], Token::Regex(r"^a\.b/c$".into()));
    }

    #[test]
    fn symbols_and_numbers() {
        assert_eq!(
            tokens("a=~b!~c<>d>=1.5::"),
            vec![
                Token::Ident("a".into()),
                Token::Symbol(Symbol::EqRegex),
                Token::Ident("b".into()),
                Token::Symbol(Symbol::NotEqRegex),
                Token::Ident("c".into()),
                Token::Symbol(Symbol::NotEq),
                Token::Ident("d".into()),
                Token::Symbol(Symbol::GtEq),
                Token::Float(1.5),
                Token::Symbol(Symbol::DoubleColon),
                Token::Eof,
            ]
        );
    }

    #[test]
    fn unterminated_string_reports_offset() {
        let err = tokenize("SELECT 'abc").expect_err("unterminated string");
        assert_eq!(err.char, 8);
    }

    #[test]
    fn bad_duration_unit_rejected() {
        let err = tokenize("time(5mx)").expect_err("invalid unit");
        assert!(
            err.message.contains("invalid duration unit"),
            "{}",
            err.message
        );
    }
}
