//! Diagnostics: every problem located like a compiler would (file, line, column), with what is
//! wrong and how to fix it. The `Sink` collects them all and parses the values every section
//! shares (durations, addresses); unknown keys get a "did you mean" from the edit distance.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::DeTable;

/// Whether a diagnostic stops the configuration from loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The configuration cannot be used.
    Error,
    /// The configuration works but probably not as meant.
    Warning,
}

/// One problem in a configuration file, located like a compiler would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub level: Level,
    /// The file as the user named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {level}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// A configuration that cannot be used: every error found, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The errors (never empty).
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Collects the errors and warnings of one file as it is read and compiled.
pub(super) struct Sink<'a> {
    pub(super) source: &'a str,
    pub(super) file: &'a str,
    pub(super) errors: Vec<Diagnostic>,
    pub(super) warnings: Vec<Diagnostic>,
}

impl Sink<'_> {
    fn diagnostic(
        &self,
        level: Level,
        span: Range<usize>,
        message: String,
        help: Option<String>,
    ) -> Diagnostic {
        let (line, column) = line_column(self.source, span.start);
        Diagnostic {
            level,
            file: self.file.to_owned(),
            line,
            column,
            message,
            help,
        }
    }

    /// The 1-based line of a byte offset.
    pub(super) fn line(&self, offset: usize) -> usize {
        line_column(self.source, offset).0
    }

    pub(super) fn error(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let d = self.diagnostic(Level::Error, span, message.into(), help);
        self.errors.push(d);
    }

    pub(super) fn warn(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let d = self.diagnostic(Level::Warning, span, message.into(), help);
        self.warnings.push(d);
    }

    pub(super) fn duration(
        &mut self,
        raw: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw.get_ref().trim()) {
            Ok(d) => d,
            Err(_) => {
                self.error(
                    raw.span(),
                    format!("`{field}` is not a duration: {:?}", raw.get_ref()),
                    Some(
                        "write a number with a unit, e.g. \"500ms\", \"10s\", \"5m\", \"1h 30m\""
                            .into(),
                    ),
                );
                default
            }
        }
    }

    pub(super) fn socket_addr(&mut self, raw: &Spanned<String>, field: &str) -> Option<SocketAddr> {
        match raw.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    raw.span(),
                    format!(
                        "`{field}` is not an address with a port: {:?}",
                        raw.get_ref()
                    ),
                    Some("write IP:PORT, e.g. \"0.0.0.0:1883\" or \"[::]:1883\"".into()),
                );
                None
            }
        }
    }
}

/// 1-based line and character column of byte `offset` in `source`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Turns the TOML library's message into a sentence and a fix.
pub(super) fn explain_toml_error(message: &str) -> (String, Option<String>) {
    let message = message.trim().to_owned();
    let help = if message.starts_with("unknown field") {
        Some(
            "remove the field or correct its spelling; the expected fields are listed above".into(),
        )
    } else if message.starts_with("missing field") {
        Some("add the field; see config/watchpost.toml for a complete example".into())
    } else if message.contains("unknown variant") {
        Some("severity is one of \"info\", \"warning\", \"critical\"".into())
    } else {
        None
    };
    (message, help)
}

/// Reports every key of `table` not in `known`, with a suggestion if one is close.
pub(super) fn check_keys(table: &DeTable<'_>, known: &[&str], what: &str, sink: &mut Sink<'_>) {
    for (key, _) in table.iter() {
        let k: &str = key.get_ref();
        if !known.contains(&k) {
            let help = match closest(k, known) {
                Some(near) => format!(
                    "did you mean `{near}`? The fields here are: {}",
                    known.join(", ")
                ),
                None => format!("the fields here are: {}", known.join(", ")),
            };
            sink.error(
                key.span(),
                format!("unknown field `{k}` in {what}"),
                Some(help),
            );
        }
    }
}

/// The known name nearest to `key` (by edit distance), if it is near enough to be a typo.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = if ca == *cb { prev } else { prev + 1 };
            prev = row[j + 1];
            row[j + 1] = cost.min(row[j] + 1).min(prev + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("ab\ncé\nx", 6), (2, 3));
        assert_eq!(line_column("", 10), (1, 1));
    }
}
