//! MQTT topic filters: validation and matching. Pure functions, no I/O.
//!
//! Rules select readings with an MQTT topic filter (`sensors/+/temperature`); this module
//! checks a filter's syntax once, at config time, and matches topics against it on the hot path.

use std::fmt;

/// A syntactically valid MQTT topic filter (MQTT 3.1.1 section 4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

/// Why a string is not a valid topic filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The filter is the empty string.
    #[error("the filter is empty")]
    Empty,
    /// `#` appears other than as the whole last level.
    #[error("`#` must be the last level and stand alone (`a/#`, not `a/b#` or `#/a`)")]
    MisplacedHash,
    /// `+` appears other than as a whole level.
    #[error("`+` must fill a whole level (`a/+/c`, not `a/b+/c`)")]
    MisplacedPlus,
    /// The filter contains a NUL character.
    #[error("the filter contains a NUL character")]
    Nul,
}

impl TopicFilter {
    /// Checks the syntax of `filter`.
    pub fn new(filter: &str) -> Result<Self, FilterError> {
        if filter.is_empty() {
            return Err(FilterError::Empty);
        }
        if filter.contains('\0') {
            return Err(FilterError::Nul);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(FilterError::MisplacedHash);
            }
            if level.contains('+') && *level != "+" {
                return Err(FilterError::MisplacedPlus);
            }
        }
        Ok(Self(filter.to_owned()))
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True if the topic name `topic` matches this filter.
    ///
    /// Topics starting with `$` are not matched by a leading wildcard (MQTT 3.1.1 4.7.2).
    pub fn matches(&self, topic: &str) -> bool {
        matches_levels(self.0.split('/'), topic.split('/'), topic.starts_with('$'))
    }

    /// True if some topic made of `pattern`'s levels could match this filter, where a `+` in
    /// the pattern stands for any single non-empty level. Used to reject rules that can never
    /// see a reading (`alerts/#` against `sensors/+/+`).
    pub fn can_match_pattern(&self, pattern: &str) -> bool {
        let mut filter = self.0.split('/');
        let mut levels = pattern.split('/');
        loop {
            match (filter.next(), levels.next()) {
                (Some("#"), _) => return true,
                (None, None) => return true,
                (Some(_), None) | (None, Some(_)) => return false,
                (Some(f), Some(p)) => {
                    if f != "+" && p != "+" && f != p {
                        return false;
                    }
                }
            }
        }
    }
}

fn matches_levels<'a>(
    mut filter: impl Iterator<Item = &'a str>,
    mut topic: impl Iterator<Item = &'a str>,
    system_topic: bool,
) -> bool {
    let mut first = true;
    loop {
        match (filter.next(), topic.next()) {
            (Some("#"), _) => return !(first && system_topic),
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some(f), Some(t)) => {
                if f == "+" {
                    if first && system_topic {
                        return false;
                    }
                } else if f != t {
                    return false;
                }
            }
        }
        first = false;
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_syntax_is_checked() {
        let cases = [
            ("sensors/+/temperature", Ok(())),
            ("sensors/#", Ok(())),
            ("#", Ok(())),
            ("+", Ok(())),
            ("", Err(FilterError::Empty)),
            ("sensors/#/x", Err(FilterError::MisplacedHash)),
            ("sensors/a#", Err(FilterError::MisplacedHash)),
            ("sensors/a+/x", Err(FilterError::MisplacedPlus)),
        ];
        for (filter, expected) in cases {
            assert_eq!(TopicFilter::new(filter).map(|_| ()), expected, "{filter}");
        }
    }

    #[test]
    fn topics_match_filters() {
        let cases = [
            (
                "sensors/+/temperature",
                "sensors/boiler-1/temperature",
                true,
            ),
            ("sensors/+/temperature", "sensors/boiler-1/humidity", false),
            (
                "sensors/+/temperature",
                "sensors/boiler-1/temperature/x",
                false,
            ),
            ("sensors/#", "sensors", true),
            ("sensors/#", "sensors/a/b", true),
            ("sensors/+", "sensors/", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            (
                "sensors/boiler-1/temperature",
                "sensors/boiler-1/temperature",
                true,
            ),
        ];
        for (filter, topic, expected) in cases {
            let f = TopicFilter::new(filter).unwrap();
            assert_eq!(f.matches(topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn reachability_of_a_pattern() {
        let cases = [
            ("sensors/+/temperature", true),
            ("sensors/#", true),
            ("#", true),
            ("sensors/boiler-1/+", true),
            ("alerts/#", false),
            ("sensors/+", false),
            ("sensors/+/+/+", false),
        ];
        for (filter, expected) in cases {
            let f = TopicFilter::new(filter).unwrap();
            assert_eq!(f.can_match_pattern("sensors/+/+"), expected, "{filter}");
        }
    }
}
