//! `[homeassistant]`: Home Assistant MQTT discovery ([`crate::homeassistant`]), read and
//! checked.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::diagnostics::Sink;
use super::raw::RawRule;
use crate::homeassistant::{BINARY_SENSOR_CLASSES, DEFAULT_PREFIX, DEVICE_CLASS_LABEL};

/// `[homeassistant]`: MQTT discovery for Home Assistant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeAssistantConfig {
    /// Publish discovery messages (default off).
    pub discovery: bool,
    /// Home Assistant's discovery prefix (default `homeassistant`, as Home Assistant's).
    pub prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            discovery: false,
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHomeAssistant {
    pub(super) discovery: Option<Spanned<bool>>,
    pub(super) prefix: Option<Spanned<String>>,
}

/// The checked section; with discovery on, rules whose `device_class` label Home Assistant
/// does not know are warned about.
pub(super) fn compile(
    raw: &RawHomeAssistant,
    rules: &[(Range<usize>, RawRule)],
    sink: &mut Sink<'_>,
) -> HomeAssistantConfig {
    let discovery = raw.discovery.as_ref().is_some_and(|d| *d.get_ref());
    let prefix = match &raw.prefix {
        None => DEFAULT_PREFIX.to_owned(),
        Some(p) => {
            let text = p.get_ref();
            if let Some(why) = prefix_problem(text) {
                sink.error(
                    p.span(),
                    format!("homeassistant.prefix {text:?} {why}"),
                    Some(format!(
                        "use Home Assistant's discovery prefix, {DEFAULT_PREFIX:?} unless you changed it there"
                    )),
                );
            } else if !discovery {
                sink.warn(
                    p.span(),
                    "homeassistant.prefix has no effect: discovery is off",
                    Some("add `discovery = true` to [homeassistant]".into()),
                );
            }
            text.clone()
        }
    };
    if discovery {
        for (span, rule) in rules {
            let Some(labels) = &rule.labels else {
                continue;
            };
            let Some(class) = labels.get_ref().get(DEVICE_CLASS_LABEL) else {
                continue;
            };
            if !BINARY_SENSOR_CLASSES.contains(&class.as_str()) {
                sink.warn(
                    if labels.span().is_empty() {
                        span.clone()
                    } else {
                        labels.span()
                    },
                    format!(
                        "rule {:?}: label {DEVICE_CLASS_LABEL} = {class:?} is not a Home Assistant binary sensor device class; discovery shows the class its name suggests, or \"problem\"",
                        rule.name.get_ref()
                    ),
                    Some(format!("use one of {}", BINARY_SENSOR_CLASSES.join(", "))),
                );
            }
        }
    }
    HomeAssistantConfig { discovery, prefix }
}

/// Why `prefix` cannot be a discovery prefix, if it cannot.
fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        return Some("is empty");
    }
    if prefix.contains(['+', '#', '\0']) {
        return Some("is not a topic: it has a wildcard or a NUL");
    }
    if prefix.starts_with('$') {
        return Some("begins with '$', which is reserved for the broker");
    }
    if prefix.split('/').any(str::is_empty) {
        return Some("has an empty level (a leading, trailing or double '/')");
    }
    let root = prefix.split('/').next().unwrap_or_default();
    if root == crate::codec::TOPIC_ROOT || root == crate::alert::TOPIC_ROOT {
        return Some("is under the gateway's own sensors/ or alerts/");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    const GATEWAY: &str = "[gateway]\nid = \"site-1\"\n";

    fn diagnostics(src: &str) -> (Vec<String>, Vec<String>) {
        let show = |d: &super::super::Diagnostic| format!("{}:{} {}", d.line, d.column, d.message);
        match parse(src, "t.toml") {
            Ok(loaded) => (vec![], loaded.warnings.iter().map(show).collect()),
            Err(e) => (e.errors.iter().map(show).collect(), vec![]),
        }
    }

    #[test]
    fn discovery_is_off_by_default_with_home_assistants_prefix() {
        let config = parse(GATEWAY, "t.toml").unwrap().config;
        assert_eq!(config.homeassistant, HomeAssistantConfig::default());
        assert!(!config.homeassistant.discovery);
        assert_eq!(config.homeassistant.prefix, "homeassistant");
        let on = parse(
            &format!("{GATEWAY}[homeassistant]\ndiscovery = true\nprefix = \"ha/site-1\"\n"),
            "t.toml",
        )
        .unwrap()
        .config;
        assert_eq!(
            on.homeassistant,
            HomeAssistantConfig {
                discovery: true,
                prefix: "ha/site-1".into()
            }
        );
    }

    #[test]
    fn a_prefix_that_cannot_be_one_is_an_error_where_it_is_written() {
        for (prefix, why) in [
            ("", "is empty"),
            ("home/#", "wildcard"),
            ("$SYS", "reserved for the broker"),
            ("/homeassistant", "empty level"),
            ("ha//x", "empty level"),
            ("sensors/ha", "under the gateway's own"),
            ("alerts", "under the gateway's own"),
        ] {
            let (errors, _) = diagnostics(&format!(
                "{GATEWAY}[homeassistant]\ndiscovery = true\nprefix = {prefix:?}\n"
            ));
            assert_eq!(errors.len(), 1, "{prefix:?}: {errors:?}");
            assert!(
                errors[0].starts_with("5:10 ") && errors[0].contains(why),
                "{prefix:?}: {errors:?}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_reported() {
        let (errors, _) = diagnostics(&format!(
            "{GATEWAY}[homeassistant]\ndiscovery = \"yes\"\ndiscovery_prefix = \"ha\"\n"
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("5:1 ") && e.contains("discovery_prefix")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("4:13 ")),
            "the type error points at the value: {errors:?}"
        );
    }

    #[test]
    fn an_unknown_device_class_label_is_a_warning_with_discovery_on() {
        let rule = "[[rule]]\nname = \"leak\"\nmatch = \"sensors/+/leak\"\nequals = true\nlabels = { device_class = \"wetness\" }\n";
        let (errors, warnings) = diagnostics(&format!(
            "{GATEWAY}[homeassistant]\ndiscovery = true\n{rule}"
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(
            warnings.iter().any(
                |w| w.starts_with("9:10 ") && w.contains("\"wetness\" is not a Home Assistant")
            ),
            "{warnings:?}"
        );
        let (_, off) = diagnostics(&format!("{GATEWAY}{rule}"));
        assert!(off.is_empty(), "only a label without discovery: {off:?}");
        let good = rule.replace("wetness", "moisture");
        let (_, fine) = diagnostics(&format!(
            "{GATEWAY}[homeassistant]\ndiscovery = true\n{good}"
        ));
        assert!(fine.is_empty(), "{fine:?}");
    }

    #[test]
    fn a_prefix_without_discovery_is_a_warning() {
        let (_, warnings) = diagnostics(&format!("{GATEWAY}[homeassistant]\nprefix = \"ha\"\n"));
        let ours: Vec<_> = warnings
            .iter()
            .filter(|w| w.contains("homeassistant"))
            .collect();
        assert_eq!(ours.len(), 1, "{warnings:?}");
        assert!(
            ours[0].starts_with("4:10 ") && ours[0].contains("no effect"),
            "{warnings:?}"
        );
    }
}
