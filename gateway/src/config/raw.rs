//! The raw shape of the file: serde structs that mirror the TOML (`deny_unknown_fields`), and
//! the readers that take each section and `[[array]]` on its own, with its span.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{IgnoredAny, IntoDeserializer};
use toml::Spanned;
use toml::de::DeValue;

use super::diagnostics::{Sink, check_keys, explain_toml_error};
use crate::rules::Severity;

/// Top-level keys of the file.
pub(super) const TOP_LEVEL: &[&str] = &[
    "gateway",
    "broker",
    "uplink",
    "history",
    "http",
    "peer",
    "rule",
    "source",
    "acl",
    "homeassistant",
];

/// The sections of the file, read independently.
pub(super) struct Raw {
    pub(super) broker: RawBroker,
    pub(super) uplink: Option<RawUplink>,
    pub(super) history: RawHistory,
    pub(super) http: RawHttp,
    pub(super) peer: Option<RawPeer>,
    pub(super) rules: Vec<(Range<usize>, RawRule)>,
    pub(super) sources: Vec<(Range<usize>, RawSource)>,
    pub(super) acl: Vec<(Range<usize>, RawAcl)>,
    pub(super) homeassistant: super::homeassistant::RawHomeAssistant,
}

/// The field names serde's derive gives a struct, found by asking it to deserialize from a
/// probe that only records them.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::value::Error;
    struct Probe<'a>(&'a std::cell::Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(serde::de::Error::custom("probe"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0.set(fields);
            Err(serde::de::Error::custom("probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let cell = std::cell::Cell::new(&[][..]);
    let _ = T::deserialize(Probe(&cell));
    cell.get()
}

/// Reads one table into `T`: unknown keys are reported (all of them) and left out, then the
/// rest is deserialized; a type error is reported where it is.
pub(super) fn section<'de, T: Deserialize<'de>>(
    value: &Spanned<DeValue<'de>>,
    what: &str,
    sink: &mut Sink<'_>,
) -> Option<T> {
    let Some(table) = value.get_ref().as_table() else {
        sink.error(value.span(), format!("{what} must be a table"), None);
        return None;
    };
    let fields = fields_of::<T>();
    check_keys(table, fields, what, sink);
    let mut known = table.clone();
    let unknown: Vec<String> = table
        .iter()
        .map(|(k, _)| k.get_ref().to_string())
        .filter(|k| !fields.contains(&k.as_str()))
        .collect();
    for key in &unknown {
        known.remove(key.as_str());
    }
    match T::deserialize(Spanned::new(value.span(), DeValue::Table(known)).into_deserializer()) {
        Ok(t) => Some(t),
        Err(e) => {
            let (message, help) = explain_toml_error(e.message());
            sink.error(
                e.span().unwrap_or(value.span()),
                format!("in {what}: {message}"),
                help,
            );
            None
        }
    }
}

/// Reads an array of tables (`[[rule]]`), each on its own; returns each with its span.
pub(super) fn array<'de, T: Deserialize<'de>>(
    value: Option<&Spanned<DeValue<'de>>>,
    what: &str,
    sink: &mut Sink<'_>,
) -> Vec<(Range<usize>, T)> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(items) = value.get_ref().as_array() else {
        sink.error(
            value.span(),
            format!(
                "{what} must be an array of tables: write [[{}]]",
                what.trim_matches(['[', ']'])
            ),
            None,
        );
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| section(item, what, sink).map(|t| (item.span(), t)))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) id: Spanned<String>,
    pub(super) site: Option<Spanned<String>>,
    pub(super) data_dir: Option<Spanned<String>>,
    pub(super) watch_config: Option<bool>,
    pub(super) log: Option<Spanned<String>>,
    pub(super) stale_after: Option<Spanned<String>>,
    pub(super) forget_after: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) name: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) secret_file: Spanned<String>,
    pub(super) takeover_after: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) login: Option<Spanned<bool>>,
    pub(super) tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) listen: Option<Spanned<String>>,
    /// Gone (`listen` serves both protocol versions); read, whatever its value, only to say so.
    pub(super) listen_v5: Option<Spanned<IgnoredAny>>,
    pub(super) allow_anonymous: Option<Spanned<bool>>,
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) max_payload_bytes: Option<Spanned<usize>>,
    pub(super) max_packet_bytes: Option<Spanned<usize>>,
    pub(super) credentials: Option<Spanned<String>>,
    pub(super) max_publish_rate: Option<Spanned<u32>>,
    pub(super) max_metrics_per_device: Option<Spanned<usize>>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) max_keep_alive: Option<Spanned<String>>,
    pub(super) receive_maximum: Option<Spanned<u64>>,
    pub(super) max_session_expiry: Option<Spanned<String>>,
    pub(super) max_queued_messages: Option<Spanned<usize>>,
    pub(super) max_queued_bytes: Option<Spanned<usize>>,
    pub(super) max_retained_messages: Option<Spanned<usize>>,
    pub(super) max_retained_bytes: Option<Spanned<usize>>,
    pub(super) refuse_subscriptions: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) listen: Spanned<String>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    pub(super) client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUplink {
    pub(super) url: Spanned<String>,
    pub(super) client_id: Option<Spanned<String>>,
    pub(super) topic_prefix: Option<Spanned<String>>,
    pub(super) forward: Option<Spanned<Vec<Severity>>>,
    pub(super) keep_alive: Option<Spanned<String>>,
    pub(super) summaries: Option<Spanned<RawSummaries>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) client_cert: Option<Spanned<String>>,
    pub(super) client_key: Option<Spanned<String>>,
    pub(super) username: Option<Spanned<String>>,
    pub(super) password: Option<Spanned<String>>,
    pub(super) profile: Option<Spanned<String>>,
    pub(super) mqtt_version: Option<Spanned<String>>,
    pub(super) qos: Option<Spanned<i64>>,
    pub(super) retain: Option<Spanned<bool>>,
    pub(super) shared_access_key: Option<Spanned<String>>,
    pub(super) token_ttl: Option<Spanned<String>>,
    pub(super) access_token: Option<Spanned<String>>,
    pub(super) alerts_as: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSummaries {
    pub(super) interval: Spanned<String>,
    pub(super) metrics: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHistory {
    pub(super) window: Option<Spanned<String>>,
    pub(super) raw_retention: Option<Spanned<String>>,
    pub(super) max_db_mb: Option<Spanned<u64>>,
    pub(super) reserve_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: Spanned<String>,
    #[serde(rename = "match")]
    pub(super) filter: Option<Spanned<String>>,
    pub(super) kind: Option<Spanned<String>>,
    pub(super) above: Option<Spanned<f64>>,
    pub(super) below: Option<Spanned<f64>>,
    pub(super) clear_below: Option<Spanned<f64>>,
    pub(super) clear_above: Option<Spanned<f64>>,
    pub(super) rate_above: Option<Spanned<f64>>,
    pub(super) rate_below: Option<Spanned<f64>>,
    pub(super) rate_per: Option<Spanned<String>>,
    pub(super) deviation_above: Option<Spanned<f64>>,
    pub(super) clear_within: Option<Spanned<f64>>,
    pub(super) window: Option<Spanned<String>>,
    pub(super) min_samples: Option<Spanned<u32>>,
    pub(super) silent_for: Option<Spanned<String>>,
    pub(super) silent_factor: Option<Spanned<f64>>,
    pub(super) scope: Option<Spanned<String>>,
    pub(super) offline_for: Option<Spanned<String>>,
    #[serde(rename = "for")]
    pub(super) hold: Option<Spanned<String>>,
    pub(super) severity: Option<Spanned<Severity>>,
    pub(super) renotify: Option<Spanned<String>>,
    pub(super) cooldown: Option<Spanned<String>>,
    pub(super) forward: Option<Spanned<bool>>,
    pub(super) labels: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) equals: Option<Spanned<RawValue>>,
    #[serde(rename = "in")]
    pub(super) in_: Option<Spanned<Vec<RawValue>>>,
    pub(super) not_in: Option<Spanned<Vec<RawValue>>>,
    pub(super) changes_above: Option<Spanned<u32>>,
}

/// A value as the file writes it: a number, a boolean or text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// One entry of a source's `metrics`: the metric's name, or a table that also types it and
/// maps its values.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawField {
    Name(String),
    Full(RawFieldTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFieldTable {
    pub(super) metric: String,
    pub(super) kind: Option<String>,
    pub(super) values: Option<BTreeMap<String, RawValue>>,
}

/// A source's presence: its topic, or a table with the topic and its words.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawPresence {
    Topic(String),
    Full(RawPresenceTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPresenceTable {
    pub(super) topic: String,
    pub(super) field: Option<String>,
    pub(super) online: Option<Vec<String>>,
    pub(super) offline: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) name: Spanned<String>,
    pub(super) topic: Spanned<String>,
    pub(super) payload: Spanned<String>,
    pub(super) metrics: Option<Spanned<BTreeMap<String, RawField>>>,
    pub(super) metric: Option<Spanned<String>>,
    pub(super) kind: Option<Spanned<String>>,
    pub(super) values: Option<Spanned<BTreeMap<String, RawValue>>>,
    pub(super) presence: Option<Spanned<RawPresence>>,
    pub(super) ignore: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcl {
    pub(super) client: Option<Spanned<String>>,
    pub(super) role: Option<Spanned<crate::access::Role>>,
    pub(super) anonymous: Option<Spanned<bool>>,
    pub(super) everyone: Option<Spanned<bool>>,
    pub(super) allow: Option<Spanned<String>>,
    pub(super) deny: Option<Spanned<String>>,
    pub(super) topics: Spanned<Vec<Spanned<String>>>,
}
