//! Span-aware checking: each config section and each array entry is deserialized on its own,
//! so one run reports every problem with its line instead of stopping at the first.

use std::fmt;
use std::ops::Range;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a config file, with the line it is on and the key it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based line number, or 0 when the problem has no place in the file.
    pub line: usize,
    /// Dotted path of the key, such as `devices[2].profile`.
    pub key: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (0, true) => write!(f, "{}", self.message),
            (0, false) => write!(f, "{}: {}", self.key, self.message),
            (line, true) => write!(f, "line {line}: {}", self.message),
            (line, false) => write!(f, "line {line}: {}: {}", self.key, self.message),
        }
    }
}

/// Converts byte offsets into line numbers and collects problems.
pub struct Checker<'a> {
    text: &'a str,
    pub problems: Vec<ConfigProblem>,
}

impl<'a> Checker<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text, problems: Vec::new() }
    }

    /// Returns the 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    pub fn push(&mut self, span: Option<Range<usize>>, key: impl Into<String>, message: impl Into<String>) {
        let line = span.map_or(0, |s| self.line_of(s.start));
        self.problems.push(ConfigProblem { line, key: key.into(), message: message.into() });
    }

    /// Deserializes one value, recording a problem with its line on failure.
    pub fn deserialize<T: DeserializeOwned>(&mut self, key: &str, value: &Spanned<DeValue<'_>>) -> Option<T> {
        let mut owned = value.clone();
        owned.get_mut().make_owned();
        match T::deserialize(owned.into_deserializer()) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                let span = error.span().or_else(|| Some(value.span()));
                self.push(span, key, explain_serde_error(error.message()));
                None
            }
        }
    }

    /// Deserializes each entry of an array of tables, returning the entries that parsed
    /// together with where each entry and its keys are in the file.
    pub fn deserialize_array<T: DeserializeOwned>(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<(T, EntrySpans)> {
        let Some(array) = value.get_ref().as_array() else {
            self.push(
                Some(value.span()),
                key,
                format!("`{key}` must be an array of tables, written as [[{key}]] sections"),
            );
            return Vec::new();
        };
        let mut parsed = Vec::new();
        for (index, entry) in array.iter().enumerate() {
            let entry_key = format!("{key}[{index}]");
            if let Some(item) = self.deserialize::<T>(&entry_key, entry) {
                parsed.push((item, EntrySpans::of(entry)));
            }
        }
        parsed
    }
}

/// Where one array entry and each of its top-level keys are in the file.
#[derive(Clone, Debug, Default)]
pub struct EntrySpans {
    pub entry: Range<usize>,
    keys: Vec<(String, Range<usize>)>,
}

impl EntrySpans {
    fn of(entry: &Spanned<DeValue<'_>>) -> Self {
        let keys = entry
            .get_ref()
            .as_table()
            .map(|table| table.iter().map(|(k, _)| (k.get_ref().to_string(), k.span())).collect())
            .unwrap_or_default();
        Self { entry: entry.span(), keys }
    }

    /// Returns the span of `key`, or of the whole entry when the key is absent.
    pub fn key(&self, key: &str) -> Range<usize> {
        self.keys.iter().find(|(k, _)| k == key).map_or_else(|| self.entry.clone(), |(_, s)| s.clone())
    }
}

/// Rewords serde's messages where they leave the fix unsaid.
fn explain_serde_error(message: &str) -> String {
    if message.starts_with("unknown field") {
        format!("{message}; remove the key or correct its spelling")
    } else if message.starts_with("missing field") {
        format!("{message}; add it")
    } else {
        message.to_owned()
    }
}

/// Parses TOML text into a spanned table, or a problem for a syntax error.
pub fn parse_document(text: &str) -> Result<Spanned<DeTable<'_>>, ConfigProblem> {
    DeTable::parse(text).map_err(|error| {
        let checker = Checker::new(text);
        ConfigProblem {
            line: error.span().map_or(0, |s| checker.line_of(s.start)),
            key: String::new(),
            message: format!("invalid TOML: {}", error.message()),
        }
    })
}
