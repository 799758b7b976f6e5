//! Reading operator-written TOML (config and routing policies) so that every problem can be
//! reported at once with its file, line and key.
//!
//! Three passes: a recovering parse that reports every syntax error; a typed serde pass
//! that collects every unknown key (through `serde_ignored`) instead of stopping at the
//! first; and an index from key paths (`rule[2].tier`) to lines, so that the validation
//! done afterwards on typed values can still point at a line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One thing wrong with an operator's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; `None` when the problem has no place in the file (a missing section).
    pub line: Option<usize>,
    /// Dotted key path such as `rule[2].when.regex`; empty for whole-file problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found, in file order; displays one per line.
#[derive(Debug, Clone)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A parsed file, kept so that later validation can locate keys.
pub struct TomlFile {
    pub path: PathBuf,
    lines: HashMap<String, usize>,
}

impl TomlFile {
    /// Reads and deserializes `path`. Syntax errors, type errors and unknown keys come back
    /// as problems with lines; on success the typed value and a key index.
    pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(T, TomlFile), Vec<Problem>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Problem {
                file: path.to_owned(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }]
        })?;
        Self::parse(path, &text)
    }

    pub fn parse<T: DeserializeOwned>(
        path: &Path,
        text: &str,
    ) -> Result<(T, TomlFile), Vec<Problem>> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let problem = |line: Option<usize>, key: String, message: String| Problem {
            file: path.to_owned(),
            line,
            key,
            message,
        };

        let (table, syntax_errors) = DeTable::parse_recoverable(text);
        if !syntax_errors.is_empty() {
            return Err(syntax_errors
                .iter()
                .map(|e| {
                    let line = e.span().map(|s| line_of(s.start));
                    problem(line, String::new(), e.message().trim().to_owned())
                })
                .collect());
        }
        let mut file = TomlFile {
            path: path.to_owned(),
            lines: HashMap::new(),
        };
        index_table(&mut file.lines, "", table.get_ref(), &line_of);

        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| vec![problem(None, String::new(), e.message().to_owned())])?;
        let mut unknown = Vec::new();
        let mut record_unknown = |path: serde_ignored::Path<'_>| unknown.push(key_path(&path));
        let ignoring = serde_ignored::Deserializer::new(deserializer, &mut record_unknown);
        let typed: Result<T, _> = serde_path_to_error::deserialize(ignoring);
        let mut problems: Vec<Problem> = unknown
            .iter()
            .map(|key| problem(file.line(key), key.clone(), "unknown key".to_owned()))
            .collect();
        match typed {
            Ok(value) if problems.is_empty() => Ok((value, file)),
            Ok(_) => Err(problems),
            Err(e) => {
                let key = e.path().to_string().replace(".[", "[");
                let key = if key == "." { String::new() } else { key };
                let line = e
                    .inner()
                    .span()
                    .map(|s| line_of(s.start))
                    .or(file.line(&key));
                problems.push(problem(line, key, e.inner().message().trim().to_owned()));
                problems.sort_by_key(|p| p.line);
                Err(problems)
            }
        }
    }

    /// The line of `key`, or of its nearest parent that has one.
    pub fn line(&self, key: &str) -> Option<usize> {
        let mut key = key;
        loop {
            if let Some(line) = self.lines.get(key) {
                return Some(*line);
            }
            let cut = key.rfind(['.', '['])?;
            key = &key[..cut];
        }
    }

    /// Whether the file wrote `key` itself.
    pub fn has(&self, key: &str) -> bool {
        self.lines.contains_key(key)
    }

    /// A problem at `key` in this file.
    pub fn problem(&self, key: impl Into<String>, message: impl Into<String>) -> Problem {
        let key = key.into();
        Problem {
            file: self.path.clone(),
            line: self.line(&key),
            key,
            message: message.into(),
        }
    }
}

fn index_table(
    lines: &mut HashMap<String, usize>,
    prefix: &str,
    table: &DeTable<'_>,
    line_of: &dyn Fn(usize) -> usize,
) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        lines.insert(path.clone(), line_of(key.span().start));
        index_value(lines, &path, value, line_of);
    }
}

fn index_value(
    lines: &mut HashMap<String, usize>,
    path: &str,
    value: &Spanned<DeValue<'_>>,
    line_of: &dyn Fn(usize) -> usize,
) {
    match value.get_ref() {
        DeValue::Table(table) => index_table(lines, path, table, line_of),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                lines.insert(item_path.clone(), line_of(item.span().start));
                index_value(lines, &item_path, item, line_of);
            }
        }
        _ => {}
    }
}

/// `rule[2].when.foo` from serde_ignored's path.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        P::Map { parent, key } => {
            let parent = key_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            key_path(parent)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // only deserialized, to see what the parser reports
    struct Doc {
        #[serde(default)]
        item: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Item {
        name: String,
        #[serde(default)]
        size: u32,
    }

    fn parse(text: &str) -> Result<(Doc, TomlFile), Vec<Problem>> {
        TomlFile::parse(Path::new("x.toml"), text)
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let problems =
            parse("[[item]]\nname = \"a\"\ncolour = 1\n\n[[item]]\nname = \"b\"\nshape = 2\n")
                .err()
                .expect("unknown keys");
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "x.toml:3: item[0].colour: unknown key",
                "x.toml:7: item[1].shape: unknown key"
            ]
        );
    }

    #[test]
    fn type_error_names_key_and_line() {
        let problems = parse("[[item]]\nname = \"a\"\nsize = \"big\"\n")
            .err()
            .expect("type error");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(3), "{}", problems[0]);
        assert_eq!(problems[0].key, "item[0].size", "{}", problems[0]);
    }

    #[test]
    fn syntax_error_has_a_line() {
        let problems = parse("[[item]]\nname = \"a\nsize = 3\n")
            .err()
            .expect("syntax");
        assert_eq!(problems[0].line, Some(2), "{}", problems[0]);
    }

    #[test]
    fn lines_of_nested_keys_fall_back_to_the_parent() {
        let Ok((_, file)) = parse("[[item]]\nname = \"a\"\n\n[[item]]\nname = \"b\"\nsize = 4\n")
        else {
            panic!("valid document rejected");
        };
        assert_eq!(file.line("item[1].size"), Some(6));
        assert_eq!(file.line("item[1].missing"), file.line("item[1]"));
        assert_eq!(file.line("item[0].name"), Some(2));
    }
}
