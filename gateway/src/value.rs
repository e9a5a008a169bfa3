//! A reading's value: a number or a state. Pure, no I/O.
//!
//! One value type flows through codec → rules → store → alert document, so a leak sensor's
//! `true` and a thermometer's `21.5` take the same path. A state is a boolean or a short text
//! (`open`, `heat`, `single`); how one is read from text is decided here, once:
//!
//! | text (trimmed) | value |
//! |---|---|
//! | a finite number (`21.5`, `-3`, `1e3`) | [`Value::Number`] |
//! | `true` / `false`, any case | [`Value::Bool`] |
//! | `on` / `off`, `open` / `closed`, `online` / `offline`, any case | that word in lower case |
//! | other text up to [`MAX_STATE_LEN`] bytes, no control characters | the text as written |
//!
//! `NaN` and infinities are not values. Text that is longer, holds a control character or looks
//! like JSON structure (`{`, `[`, `"`) is not a state either: it is malformed input, counted.
//! Because of these rules a text state never spells a number or a boolean, which is what lets
//! the store keep every value in one dynamically typed column and read it back unchanged.
//!
//! A [`ValueMap`] (from a source's configuration) turns a product's own words or levels into
//! values before these rules apply: `ON` → `on`, `0` → `dry`, `"low"` → `1`.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest text state, in bytes. Longer text is not a state but malformed input: states are
/// words a rule can compare against, not log lines.
pub const MAX_STATE_LEN: usize = 64;

/// Words that are states without any configuration, in their canonical (lower case) form.
/// `true` and `false` are booleans and not in this list.
pub const DEFAULT_WORDS: &[&str] = &["on", "off", "open", "closed", "online", "offline"];

/// A reading's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A finite number.
    Number(f64),
    /// A boolean state (`true` / `false`).
    Bool(bool),
    /// A text state: never empty, never a number or a boolean, at most [`MAX_STATE_LEN`] bytes.
    Text(Arc<str>),
}

impl Default for Value {
    fn default() -> Self {
        Value::Number(0.0)
    }
}

/// Why text is not a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Empty (or only white space).
    #[error("the value is empty")]
    Empty,
    /// NaN or an infinity.
    #[error("value is not finite (NaN or infinity)")]
    NotFinite,
    /// Longer than [`MAX_STATE_LEN`].
    #[error("a state is at most 64 bytes of text")]
    TooLong,
    /// Holds a control character or looks like JSON structure.
    #[error("not a number and not a state (a state is a short word, without control characters)")]
    NotAState,
}

impl Value {
    /// Reads a value from text by the rules of the module docs.
    pub fn parse(text: &str) -> Result<Value, ValueError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ValueError::Empty);
        }
        // Only text that starts like a number is tried as one: `inf` and `nan` are words to
        // Rust's parser but not numbers to anyone else.
        if text.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '-' | '+' | '.')) {
            if let Ok(n) = text.parse::<f64>() {
                return if n.is_finite() {
                    Ok(Value::Number(n))
                } else {
                    Err(ValueError::NotFinite)
                };
            }
        }
        if text.eq_ignore_ascii_case("true") {
            return Ok(Value::Bool(true));
        }
        if text.eq_ignore_ascii_case("false") {
            return Ok(Value::Bool(false));
        }
        if let Some(word) = DEFAULT_WORDS.iter().find(|w| text.eq_ignore_ascii_case(w)) {
            return Ok(Value::Text(Arc::from(*word)));
        }
        if [
            "nan",
            "inf",
            "+inf",
            "-inf",
            "infinity",
            "+infinity",
            "-infinity",
        ]
        .iter()
        .any(|w| text.eq_ignore_ascii_case(w))
        {
            return Err(ValueError::NotFinite);
        }
        if text.len() > MAX_STATE_LEN {
            return Err(ValueError::TooLong);
        }
        if text.starts_with(['{', '[', '"']) || text.chars().any(char::is_control) {
            return Err(ValueError::NotAState);
        }
        Ok(Value::Text(Arc::from(text)))
    }

    /// A number, if it is finite.
    pub fn number(n: f64) -> Result<Value, ValueError> {
        if n.is_finite() {
            Ok(Value::Number(n))
        } else {
            Err(ValueError::NotFinite)
        }
    }

    /// The number, if this is one.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// True for booleans and text: what state rules judge.
    pub fn is_state(&self) -> bool {
        !matches!(self, Value::Number(_))
    }

    /// `number`, `bool` or `text`, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Number(_) => "number",
            Value::Bool(_) => "bool",
            Value::Text(_) => "text",
        }
    }

    /// The key a value map looks this value up by: text as written, `true`/`false`, numbers
    /// in their shortest form (`1`, `2.5`).
    pub fn map_key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Text(t) => f.write_str(t),
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Number(n) => s.serialize_f64(*n),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl Visitor<'_> for ValueVisitor {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, a boolean or a short text state")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
                Ok(Value::Number(n as f64))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
                Ok(Value::Number(n as f64))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
                Value::number(n).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
                Value::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_any(ValueVisitor)
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Number(n) => ToSqlOutput::Borrowed(ValueRef::Real(*n)),
            // As text: a REAL column would turn an integer 1 into 1.0, a number.
            Value::Bool(true) => ToSqlOutput::Borrowed(ValueRef::Text(b"true")),
            Value::Bool(false) => ToSqlOutput::Borrowed(ValueRef::Text(b"false")),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

impl rusqlite::types::FromSql for Value {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        use rusqlite::types::{FromSqlError, ValueRef};
        match v {
            ValueRef::Real(n) => Ok(Value::Number(n)),
            ValueRef::Integer(n) => Ok(Value::Number(n as f64)),
            ValueRef::Text(t) => std::str::from_utf8(t)
                .map_err(|e| FromSqlError::Other(Box::new(e)))
                .and_then(|t| Value::parse(t).map_err(|e| FromSqlError::Other(Box::new(e)))),
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

/// A product's words or levels mapped onto values: keys are matched without regard to ASCII
/// case, against the value's [`Value::map_key`] (`ON`, `true`, `0`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueMap(Vec<(Box<str>, Value)>);

impl ValueMap {
    /// A map from pairs; later duplicates (by case-insensitive key) are ignored.
    pub fn new(pairs: impl IntoIterator<Item = (String, Value)>) -> Self {
        let mut out: Vec<(Box<str>, Value)> = Vec::new();
        for (k, v) in pairs {
            if !out.iter().any(|(o, _)| o.eq_ignore_ascii_case(&k)) {
                out.push((k.into_boxed_str(), v));
            }
        }
        ValueMap(out)
    }

    /// True if the map holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The mapped value of `key`, if the map has one.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let key = key.trim();
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    }

    /// The values the map can produce.
    pub fn outputs(&self) -> impl Iterator<Item = &Value> {
        self.0.iter().map(|(_, v)| v)
    }

    /// The keys, as configured.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| &**k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(Arc::from(s))
    }

    #[test]
    fn text_becomes_a_number_a_boolean_a_word_or_a_state() {
        let cases: &[(&str, Result<Value, ValueError>)] = &[
            ("21.5", Ok(Value::Number(21.5))),
            (" -3 \n", Ok(Value::Number(-3.0))),
            ("1e3", Ok(Value::Number(1000.0))),
            ("+.5", Ok(Value::Number(0.5))),
            ("true", Ok(Value::Bool(true))),
            ("FALSE", Ok(Value::Bool(false))),
            ("True", Ok(Value::Bool(true))),
            ("ON", Ok(text("on"))),
            ("Off", Ok(text("off"))),
            ("OPEN", Ok(text("open"))),
            ("closed", Ok(text("closed"))),
            ("Online", Ok(text("online"))),
            ("OFFLINE", Ok(text("offline"))),
            ("heat", Ok(text("heat"))),
            ("Single Click", Ok(text("Single Click"))),
            ("NaN", Err(ValueError::NotFinite)),
            ("-inf", Err(ValueError::NotFinite)),
            ("infinity", Err(ValueError::NotFinite)),
            ("1e999", Err(ValueError::NotFinite)),
            ("", Err(ValueError::Empty)),
            ("   ", Err(ValueError::Empty)),
            ("{\"v\":", Err(ValueError::NotAState)),
            ("[1,2]", Err(ValueError::NotAState)),
            ("\"quoted\"", Err(ValueError::NotAState)),
            ("a\u{7}b", Err(ValueError::NotAState)),
        ];
        for (input, expected) in cases {
            assert_eq!(&Value::parse(input), expected, "{input:?}");
        }
        let long = "x".repeat(MAX_STATE_LEN + 1);
        assert_eq!(Value::parse(&long), Err(ValueError::TooLong));
        assert_eq!(
            Value::parse(&"x".repeat(MAX_STATE_LEN)),
            Ok(text(&"x".repeat(MAX_STATE_LEN)))
        );
    }

    #[test]
    fn a_state_never_spells_a_number_or_a_boolean() {
        // What `parse` makes, written and parsed again, as the same value: the store relies on it.
        for input in ["1", "2.50", "true", "On", "door ajar", "-0", "x1", "1.5e3"] {
            let v = Value::parse(input).unwrap();
            assert_eq!(Value::parse(&v.to_string()), Ok(v.clone()), "{input:?}");
        }
    }

    #[test]
    fn json_shape_of_each_kind() {
        let doc = serde_json::to_string(&[
            Value::Number(95.2),
            Value::Number(90.0),
            Value::Bool(true),
            text("open"),
        ])
        .unwrap();
        assert_eq!(doc, r#"[95.2,90.0,true,"open"]"#);
        let back: Vec<Value> = serde_json::from_str(&doc).unwrap();
        assert_eq!(back[1], Value::Number(90.0));
        assert_eq!(back[3], text("open"));
    }

    #[test]
    fn value_maps_match_without_case() {
        let map = ValueMap::new([
            ("ON".to_string(), Value::Bool(true)),
            ("off".to_string(), Value::Bool(false)),
            ("0".to_string(), text("dry")),
            ("on".to_string(), text("ignored: a duplicate")),
        ]);
        assert_eq!(map.get("on"), Some(&Value::Bool(true)));
        assert_eq!(map.get(" OFF "), Some(&Value::Bool(false)));
        assert_eq!(map.get(&Value::Number(0.0).map_key()), Some(&text("dry")));
        assert_eq!(map.get("1"), None);
        assert_eq!(map.outputs().count(), 3);
    }
}
