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
    /// Spans of each key and array entry of the document, by dotted path.
    index: SpanIndex,
    /// Paths of keys whose value failed to deserialize. Their problem is already
    /// reported, so later checks of the defaults that replaced them are not.
    suppressed: Vec<String>,
    /// Every `id` written in a `[[sites]]` entry, valid or not. A reference to a site
    /// whose entry has problems of its own is not reported again as unknown.
    written_site_ids: Vec<String>,
}

/// Maximum deserialization attempts for one section or entry. Each failed attempt removes
/// one key, so this is also the maximum number of bad keys reported per entry.
const MAX_ATTEMPTS: usize = 64;

impl<'a> Checker<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            problems: Vec::new(),
            index: SpanIndex::default(),
            suppressed: Vec::new(),
            written_site_ids: Vec::new(),
        }
    }

    /// Records where each key of `document` is, so that problems pushed without a span
    /// get the line of their key.
    pub fn index_document(&mut self, document: &Spanned<DeTable<'_>>) {
        let mut index = SpanIndex::default();
        index.add_table("", document.get_ref());
        self.index = index;
        let sites = document
            .get_ref()
            .get("sites")
            .and_then(|sites| sites.get_ref().as_array());
        self.written_site_ids = sites
            .into_iter()
            .flat_map(|sites| sites.iter())
            .filter_map(|site| {
                site.get_ref()
                    .as_table()?
                    .get("id")?
                    .get_ref()
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
    }

    /// Returns whether a `[[sites]]` entry is written with this id, even one that is
    /// invalid and so missing from the checked sites.
    pub fn is_written_site(&self, id: &str) -> bool {
        self.written_site_ids.iter().any(|written| written == id)
    }

    /// Returns the 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// Returns whether the indexed document sets `key`, a dotted path such as
    /// `server.http_listen`.
    pub fn is_written(&self, key: &str) -> bool {
        self.index.exact(key).is_some()
    }

    /// Records a problem of `key`, a dotted path such as `devices[0].rules[1].metric`.
    ///
    /// The line is that of the key when the document has it, else that of `span`, else
    /// that of the nearest enclosing key or table. Problems of a key whose value failed
    /// to deserialize are dropped, because the deserialization problem names it already.
    pub fn push(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let key = key.into();
        if self.suppressed.iter().any(|path| is_within(&key, path)) {
            return;
        }
        let span = self
            .index
            .exact(&key)
            .or(span)
            .or_else(|| self.index.nearest(&key));
        let line = span.map_or(0, |s| self.line_of(s.start));
        self.problems.push(ConfigProblem {
            line,
            key,
            message: message.into(),
        });
    }

    /// Deserializes one section or array entry at `key`, recording a problem with its
    /// line and key path for each value that does not fit.
    ///
    /// After each failure the offending key is removed and the rest is tried again, so
    /// every bad key of the entry is reported and the entry still parses when the keys
    /// left are enough. Keys removed this way take their defaults, and later checks of
    /// them are suppressed.
    pub fn deserialize<T: DeserializeOwned>(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<T> {
        let mut owned = value.clone();
        owned.get_mut().make_owned();
        for _ in 0..MAX_ATTEMPTS {
            let error = match T::deserialize(owned.clone().into_deserializer()) {
                Ok(parsed) => return Some(parsed),
                Err(error) => error,
            };
            let span = error.span();
            let path = span
                .as_ref()
                .and_then(|s| locate(&owned, s.start))
                .unwrap_or_default();
            let message = error.message();
            let problem_key = match missing_field(message) {
                Some(field) => format!("{key}{}.{field}", render_path(&path)),
                None => format!("{key}{}", render_path(&path)),
            };
            let text = explain_serde_error(message, value_at(&owned, &path));
            self.push(span.or_else(|| Some(value.span())), problem_key, text);
            // Remove the innermost key that contains the error. An error in an entry of an
            // array of tables without a key of its own, such as a missing field, removes
            // the whole array, so that the entries beside it keep their indices.
            // NOTE: a bad value of a required key ends at its "missing field" retry, so the
            // entry is dropped and its other checks (such as a URL scheme) do not run.
            let key_depth = path
                .iter()
                .rposition(|segment| matches!(segment, Segment::Key(_)))?;
            let removed = &path[..=key_depth];
            if !remove(&mut owned, removed) {
                return None;
            }
            self.suppressed
                .push(format!("{key}{}", render_path(removed)));
        }
        None
    }

    /// Deserializes each entry of an array of tables, returning the entries that parsed
    /// together with their index and where each entry and its keys are in the file.
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
                parsed.push((item, EntrySpans::of(index, entry)));
            }
        }
        parsed
    }
}

/// Returns whether `key` is `path` or a key inside it.
fn is_within(key: &str, path: &str) -> bool {
    key.strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Segment]) -> String {
    path.iter()
        .map(|segment| match segment {
            Segment::Key(key) => format!(".{key}"),
            Segment::Index(index) => format!("[{index}]"),
        })
        .collect()
}

/// A child of a table or array: its path step, its key span (none for array entries)
/// and its value.
type Child<'v, 'i> = (Segment, Option<Range<usize>>, &'v Spanned<DeValue<'i>>);

/// Returns the children of a table or array.
fn children<'v, 'i>(value: &'v DeValue<'i>) -> Vec<Child<'v, 'i>> {
    match value {
        DeValue::Table(table) => table
            .iter()
            .map(|(k, v)| (Segment::Key(k.get_ref().to_string()), Some(k.span()), v))
            .collect(),
        DeValue::Array(array) => array
            .iter()
            .enumerate()
            .map(|(i, v)| (Segment::Index(i), None, v))
            .collect(),
        _ => Vec::new(),
    }
}

/// Returns the path, below `value`, of the deepest key or value at byte `offset`.
fn locate(value: &Spanned<DeValue<'_>>, offset: usize) -> Option<Vec<Segment>> {
    let contains = |span: &Range<usize>| span.start == offset || span.contains(&offset);
    for (segment, key_span, child) in children(value.get_ref()) {
        if key_span.as_ref().is_some_and(contains) {
            return Some(vec![segment]);
        }
        if let Some(mut rest) = locate(child, offset) {
            rest.insert(0, segment);
            return Some(rest);
        }
        if contains(&child.span()) {
            return Some(vec![segment]);
        }
    }
    None
}

/// Returns the value at `path` below `value`.
fn value_at<'v, 'i>(value: &'v Spanned<DeValue<'i>>, path: &[Segment]) -> &'v DeValue<'i> {
    let mut current = value;
    for segment in path {
        let next = children(current.get_ref())
            .into_iter()
            .find(|(s, _, _)| s == segment)
            .map(|(_, _, v)| v);
        match next {
            Some(next) => current = next,
            None => break,
        }
    }
    current.get_ref()
}

/// Removes the key at `path`, which ends with a key, returning whether it was there.
fn remove(value: &mut Spanned<DeValue<'_>>, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for segment in parents {
        let next = match (current.get_mut(), segment) {
            (DeValue::Table(table), Segment::Key(key)) => table.get_mut(key.as_str()),
            (DeValue::Array(array), Segment::Index(index)) => array.get_mut(*index),
            _ => None,
        };
        match next {
            Some(next) => current = next,
            None => return false,
        }
    }
    match (current.get_mut(), last) {
        (DeValue::Table(table), Segment::Key(key)) => table.remove(key.as_str()).is_some(),
        _ => false,
    }
}

/// Returns the field name of serde's "missing field `name`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Spans of keys and array entries by dotted path, such as `devices[0].rules[1].metric`.
#[derive(Clone, Debug, Default)]
struct SpanIndex {
    spans: Vec<(String, Range<usize>)>,
}

impl SpanIndex {
    fn add_table(&mut self, prefix: &str, table: &DeTable<'_>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            self.spans.push((path.clone(), key.span()));
            self.add_value(&path, value);
        }
    }

    fn add_value(&mut self, path: &str, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::Table(table) => self.add_table(path, table),
            DeValue::Array(array) => {
                for (index, entry) in array.iter().enumerate() {
                    let entry_path = format!("{path}[{index}]");
                    self.spans.push((entry_path.clone(), entry.span()));
                    self.add_value(&entry_path, entry);
                }
            }
            _ => {}
        }
    }

    fn exact(&self, path: &str) -> Option<Range<usize>> {
        self.spans
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, span)| span.clone())
    }

    /// Returns the span of `path`, or of the nearest enclosing key or entry in the index.
    fn nearest(&self, path: &str) -> Option<Range<usize>> {
        let mut path = path;
        loop {
            if let Some(span) = self.exact(path) {
                return Some(span);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }
}

/// An entry of an array of tables: its index in the file, and where it and each of its
/// keys are.
#[derive(Clone, Debug, Default)]
pub struct EntrySpans {
    /// Index of the entry in the array as written, counting entries that failed to parse.
    pub index: usize,
    pub entry: Range<usize>,
    keys: SpanIndex,
}

impl EntrySpans {
    fn of(index: usize, entry: &Spanned<DeValue<'_>>) -> Self {
        let mut keys = SpanIndex::default();
        if let Some(table) = entry.get_ref().as_table() {
            keys.add_table("", table);
        }
        Self {
            index,
            entry: entry.span(),
            keys,
        }
    }

    /// Returns the span of `key`, a path inside the entry such as `rules[1].metric`, or of
    /// its nearest enclosing key, or of the whole entry.
    pub fn key(&self, key: &str) -> Range<usize> {
        self.keys.nearest(key).unwrap_or_else(|| self.entry.clone())
    }
}

/// Rewords serde's messages where they leave the fix unsaid; `value` is the value that
/// failed.
fn explain_serde_error(message: &str, value: &DeValue<'_>) -> String {
    if message.starts_with("unknown field") {
        format!("{message}; remove the key or correct its spelling")
    } else if message.starts_with("missing field") {
        format!("{message}; add it")
    } else if message == "invalid socket address syntax" {
        let shown = value.as_str().map_or_else(
            || format!("this {}", value.type_str()),
            |s| format!("{s:?}"),
        );
        format!("{shown} is not a socket address; write HOST:PORT such as \"127.0.0.1:8080\"")
    } else if message.ends_with("expected a duration") {
        format!("{message}; write a number with a unit, such as \"30s\", \"5m\" or \"90d\"")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        name: String,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        rules: Vec<RuleEntry>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RuleEntry {
        #[allow(dead_code)]
        metric: String,
    }

    fn check_entries(text: &str) -> (Vec<(Entry, EntrySpans)>, Vec<ConfigProblem>) {
        let document = parse_document(text).expect("valid TOML");
        let mut checker = Checker::new(text);
        checker.index_document(&document);
        let entries = checker.deserialize_array::<Entry>(
            "entries",
            document.get_ref().get("entries").expect("entries"),
        );
        (entries, checker.problems)
    }

    #[test]
    fn every_bad_key_of_entry_reported() {
        let text = "[[entries]]\nname = \"a\"\nport = \"x\"\ncolour = 1\n";
        let (entries, mut problems) = check_entries(text);
        problems.sort_by_key(|p| p.line);
        let found: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(found, [(3, "entries[0].port"), (4, "entries[0].colour")]);
        assert_eq!(entries.len(), 1, "the entry parses without its bad keys");
        assert_eq!(entries[0].0.port, 0, "a removed key takes its default");
    }

    #[test]
    fn entry_after_failed_one_keeps_index() {
        let text = "[[entries]]\nport = 1\n\n[[entries]]\nname = \"b\"\n";
        let (entries, problems) = check_entries(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "entries[0].name");
        assert_eq!(problems[0].line, 1);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1.index, 1);
        assert_eq!(entries[0].0.name, "b");
    }

    #[test]
    fn nested_entry_problem_has_its_line() {
        let text = "[[entries]]\nname = \"a\"\n\n[[entries.rules]]\nmetric = \"m\"\n\n[[entries.rules]]\nmetric = 5\n";
        let (entries, problems) = check_entries(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "entries[0].rules[1].metric");
        assert_eq!(
            entries[0].0.rules.len(),
            0,
            "the rules key with the bad entry is removed"
        );
        assert_eq!(problems[0].line, 8);
        assert_eq!(
            entries[0].1.key("rules[1].metric").start,
            text.find("metric = 5").expect("in text")
        );
    }

    #[test]
    fn removed_key_problems_suppressed() {
        let text = "[[entries]]\nname = \"a\"\nport = \"x\"\n";
        let document = parse_document(text).expect("valid TOML");
        let mut checker = Checker::new(text);
        checker.index_document(&document);
        checker.deserialize_array::<Entry>(
            "entries",
            document.get_ref().get("entries").expect("entries"),
        );
        checker.push(
            None,
            "entries[0].port",
            "a check of the default that replaced the bad value",
        );
        checker.push(None, "entries[0].name", "a check of a key that parsed");
        let keys: Vec<&str> = checker.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["entries[0].port", "entries[0].name"]);
        assert_eq!(
            checker.problems[1].line, 2,
            "a problem without a span gets its key's line"
        );
    }

    #[test]
    fn bad_socket_address_names_value() {
        let text = "[server]\nhttp_listen = \"0.0.0.0:80x0\"\n";
        let problems = crate::config::parse(text, crate::profile::ProfileSet::default())
            .expect_err("rejected");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert_eq!(problems[0].key, "server.http_listen");
        assert_eq!(
            problems[0].message,
            "\"0.0.0.0:80x0\" is not a socket address; write HOST:PORT such as \"127.0.0.1:8080\""
        );
    }
}
