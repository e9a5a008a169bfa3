//! Foreign fleets: topic layouts of other products mapped onto readings and presence by
//! configuration, not code. Pure, no I/O.
//!
//! A source names a topic pattern with `{device}` (and optionally `{metric}`) placeholders and
//! how to read the payload:
//!
//! | product | topic | payload | source |
//! |---|---|---|---|
//! | Zigbee2MQTT | `zigbee2mqtt/{device*}` (names may hold `/`) | JSON `{"water_leak":true,"battery":97}` | `payload = "json"`, `metrics` |
//! | Tasmota | `tele/{device}/SENSOR`, `stat/{device}/POWER` | nested JSON; `ON`/`OFF` | `payload = "json"`; `payload = "state"` |
//! | ESPHome | `{device}/sensor/{metric}/state`, `{device}/binary_sensor/{metric}/state` | `21.5`; `ON`/`OFF` | `payload = "number"`; `payload = "state"` |
//! | Shelly (Gen1) | `shellies/{device}/sensor/{metric}` | `21.5`, `true` | `payload = "value"` |
//! | Shelly (Gen2+) | `{device}/status/temperature:0` | JSON `{"id":0,"tC":21.5,...}` | `payload = "json"`, `metrics = { tC = "temperature" }` |
//!
//! `{device*}` takes one or more levels, for products whose device names may contain `/`
//! (Zigbee2MQTT's friendly names): the device is those levels joined by `.`, so that it stays
//! one topic level under `sensors/`. A pattern has at most one device placeholder of either
//! kind.
//!
//! **Values.** A plain payload is read by the source's `payload`: `number` (only numbers),
//! `state` (only states) or `value` (either, by [`Value::parse`]). A JSON payload gives one
//! reading per leaf, named by its path (`AM2301.Temperature`); with a `metrics` map, only the
//! mapped leaves, under their new names, each optionally typed (number or state) and with a
//! value map (`ON` → `on`, `0` → `dry`); the other leaves are counted as unmapped. Without a
//! map a leaf is a reading if it is a number, a boolean, or text that is one of the common
//! words ([`crate::value::DEFAULT_WORDS`]) or spells a number; other text (a timestamp, a
//! unit), nulls and lists are not readings and are counted as unmapped, not as errors. So are leaves named `status` or `seq`: those names
//! are reserved on native topics only, and a foreign field of that name is simply not read
//! unless a `metrics` map renames it. A name that cannot be a metric (empty, holding `/`, `+`
//! or `#`: [`check_metric_name`]) is rejected with the reason, as the native decoder does.
//!
//! **Presence.** A source may name its devices' presence topic (Tasmota's `LWT`, ESPHome's
//! `status`, Zigbee2MQTT's `availability`, Shelly's `online`) and the words for online and
//! offline; the payload is that word, or a JSON object holding it in a field (`{"state":"online"}`).
//! Such messages become presence, as a native device's `sensors/{device}/status` does.
//!
//! **Ignored topics.** Patterns of topics on the source's tree that carry no readings: a
//! bridge's own topics, commands to devices (`zigbee2mqtt/{device*}/set`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::codec::{
    DecodeError, Limits, Message, Readings, Rejected, SEQ_KEY, STATUS_METRIC, check_metric_name,
};
use crate::value::{DEFAULT_WORDS, Value, ValueMap};

/// How a source's payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A plain number.
    Number,
    /// A plain state (`ON`, `open`, `true`).
    State,
    /// A plain number or state.
    Value,
    /// A JSON object whose leaves are readings.
    Json,
}

/// What a field (or a plain payload) is declared to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldKind {
    /// Whatever arrives: a number or a state.
    #[default]
    Any,
    /// Numbers only.
    Number,
    /// States only.
    State,
}

/// A mapped JSON leaf.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Field {
    /// The metric it becomes.
    pub metric: String,
    /// What it holds.
    pub kind: FieldKind,
    /// The product's words or levels mapped onto values; empty: none.
    pub values: ValueMap,
}

/// One level of a topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Any,
    Device,
    /// `{device*}`: one or more levels.
    DeviceLevels,
    Metric,
    /// `#` at the end (ignore patterns only).
    Rest,
}

/// A checked topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    levels: Vec<Level>,
}

/// A source's presence topic and words.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    pattern: Pattern,
    /// In a JSON payload, the field that holds the word.
    pub field: String,
    /// Words that mean online (without regard to ASCII case).
    pub online: Vec<String>,
    /// Words that mean offline.
    pub offline: Vec<String>,
}

/// Default words of presence payloads: Tasmota's `Online`, Shelly's `true`, and so on.
pub const ONLINE_WORDS: &[&str] = &["online", "true"];
/// See [`ONLINE_WORDS`].
pub const OFFLINE_WORDS: &[&str] = &["offline", "false"];
/// The field of a JSON presence payload, as Zigbee2MQTT 2.x writes it.
pub const PRESENCE_FIELD: &str = "state";

/// A checked `[[source]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Name, for logs.
    pub name: String,
    pattern: Pattern,
    /// How the payload is read.
    pub payload: Payload,
    /// JSON path → field; `None` takes every leaf that is a value (module docs).
    pub fields: Option<BTreeMap<String, Field>>,
    /// The metric of a plain payload whose topic has no `{metric}`.
    pub metric: Option<String>,
    /// A plain payload's value map; empty: none.
    pub values: ValueMap,
    /// The devices' presence topic, if the source has one.
    pub presence: Option<Presence>,
    ignore: Vec<Pattern>,
}

/// Why a source pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// No `{device}` level, or more than one.
    #[error("the topic needs exactly one {{device}} or {{device*}} level")]
    Device,
    /// More than one `{metric}` level.
    #[error("the topic may have at most one {{metric}} level")]
    Metric,
    /// A level mixes a placeholder with text, or uses `#`.
    #[error(
        "a level is either text, `+`, {{device}}, {{device*}} or {{metric}}; `#` (ignore patterns only, at the end) and partial placeholders are not supported"
    )]
    Level,
    /// The pattern would take over the native `sensors/` topics.
    #[error("sources cannot start with `sensors/`: that is where native readings arrive")]
    Native,
}

impl Pattern {
    /// Checks a pattern. `ignore`: an ignore pattern, which may end in `#` and need not name
    /// a device.
    pub fn new(topic: &str, ignore: bool) -> Result<Pattern, PatternError> {
        let parts: Vec<&str> = topic.split('/').collect();
        let last = parts.len() - 1;
        let levels: Vec<Level> = parts
            .iter()
            .enumerate()
            .map(|(i, l)| match *l {
                "{device}" => Ok(Level::Device),
                "{device*}" => Ok(Level::DeviceLevels),
                "{metric}" => Ok(Level::Metric),
                "+" => Ok(Level::Any),
                "#" if ignore && i == last => Ok(Level::Rest),
                _ if l.contains(['{', '}', '#', '+']) || l.is_empty() => Err(PatternError::Level),
                _ => Ok(Level::Literal((*l).to_owned())),
            })
            .collect::<Result<_, _>>()?;
        let devices = levels
            .iter()
            .filter(|l| matches!(l, Level::Device | Level::DeviceLevels))
            .count();
        if devices > 1 || (devices == 0 && !ignore) {
            return Err(PatternError::Device);
        }
        if levels.contains(&Level::Rest) && levels.contains(&Level::DeviceLevels) {
            return Err(PatternError::Level);
        }
        if levels.iter().filter(|l| **l == Level::Metric).count() > 1 {
            return Err(PatternError::Metric);
        }
        if matches!(levels.first(), Some(Level::Literal(l)) if l == crate::codec::TOPIC_ROOT) {
            return Err(PatternError::Native);
        }
        Ok(Pattern { levels })
    }

    /// True if the topic names the metric (`{metric}`).
    fn has_metric(&self) -> bool {
        self.levels.contains(&Level::Metric)
    }

    /// The MQTT filter that covers the pattern.
    pub fn filter(&self) -> String {
        let mut out = Vec::new();
        for l in &self.levels {
            match l {
                Level::Literal(s) => out.push(s.as_str()),
                Level::DeviceLevels | Level::Rest => {
                    out.push("#");
                    break;
                }
                _ => out.push("+"),
            }
        }
        out.join("/")
    }

    /// Device (if the pattern has one; `""` otherwise) and metric of a matching topic. Runs
    /// for every message on a source's tree, so it walks the topic without allocating, but
    /// for a device of several levels, whose name it builds.
    fn captures<'a>(&self, topic: &'a str) -> Option<(Cow<'a, str>, Option<&'a str>)> {
        let mut device: Cow<'a, str> = Cow::Borrowed("");
        let mut metric = None;
        let mut take = |level: &Level, part: &'a str| match level {
            Level::Literal(l) => l == part,
            Level::Device => {
                device = Cow::Borrowed(part);
                true
            }
            Level::Metric => {
                metric = Some(part);
                true
            }
            _ => true,
        };
        match self.levels.iter().position(|l| *l == Level::DeviceLevels) {
            None => {
                let mut parts = topic.split('/');
                for level in &self.levels {
                    if *level == Level::Rest {
                        return Some((device, metric));
                    }
                    if !take(level, parts.next()?) {
                        return None;
                    }
                }
                if parts.next().is_some() {
                    return None;
                }
            }
            Some(k) => {
                // The levels before it from the front, the levels after it from the back;
                // what is left between them is the device.
                let mut rest = topic;
                for level in &self.levels[..k] {
                    let (part, tail) = rest.split_once('/')?;
                    if !take(level, part) {
                        return None;
                    }
                    rest = tail;
                }
                for level in self.levels[k + 1..].iter().rev() {
                    let (head, part) = rest.rsplit_once('/')?;
                    if !take(level, part) {
                        return None;
                    }
                    rest = head;
                }
                if rest.split('/').any(str::is_empty) {
                    return None;
                }
                device = if rest.contains('/') {
                    Cow::Owned(rest.replace('/', "."))
                } else {
                    Cow::Borrowed(rest)
                };
            }
        }
        Some((device, metric))
    }
}

impl Source {
    /// Checks a topic pattern such as `tele/{device}/SENSOR`. `metrics` maps JSON paths to
    /// metric names; [`Source::with_fields`] gives them types and value maps.
    pub fn new(
        name: &str,
        topic: &str,
        payload: Payload,
        metrics: Option<BTreeMap<String, String>>,
        metric: Option<String>,
    ) -> Result<Source, PatternError> {
        Ok(Source {
            name: name.to_owned(),
            pattern: Pattern::new(topic, false)?,
            payload,
            fields: metrics.map(|m| {
                m.into_iter()
                    .map(|(path, metric)| {
                        (
                            path,
                            Field {
                                metric,
                                ..Field::default()
                            },
                        )
                    })
                    .collect()
            }),
            metric,
            values: ValueMap::default(),
            presence: None,
            ignore: Vec::new(),
        })
    }

    /// The JSON fields, with their types and value maps.
    pub fn with_fields(mut self, fields: BTreeMap<String, Field>) -> Self {
        self.fields = Some(fields);
        self
    }

    /// A plain payload's value map.
    pub fn with_values(mut self, values: ValueMap) -> Self {
        self.values = values;
        self
    }

    /// The devices' presence topic and words (`None`: the defaults).
    pub fn with_presence(
        mut self,
        topic: &str,
        field: Option<String>,
        online: Option<Vec<String>>,
        offline: Option<Vec<String>>,
    ) -> Result<Self, PatternError> {
        let pattern = Pattern::new(topic, false)?;
        if pattern.has_metric() {
            return Err(PatternError::Metric);
        }
        let words = |w: Option<Vec<String>>, default: &[&str]| {
            w.unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect())
        };
        self.presence = Some(Presence {
            pattern,
            field: field.unwrap_or_else(|| PRESENCE_FIELD.to_owned()),
            online: words(online, ONLINE_WORDS),
            offline: words(offline, OFFLINE_WORDS),
        });
        Ok(self)
    }

    /// Topics of the source's tree that carry no readings.
    pub fn with_ignore<'t>(
        mut self,
        patterns: impl IntoIterator<Item = &'t str>,
    ) -> Result<Self, PatternError> {
        for p in patterns {
            self.ignore.push(Pattern::new(p, true)?);
        }
        Ok(self)
    }

    /// True if the topic names the metric (`{metric}`).
    pub fn has_metric_level(&self) -> bool {
        self.pattern.has_metric()
    }

    /// The MQTT filter to subscribe to.
    pub fn filter(&self) -> String {
        self.pattern.filter()
    }

    fn ignored(&self, topic: &str) -> bool {
        self.ignore.iter().any(|p| p.captures(topic).is_some())
    }

    /// True if `topic` is one of this source's readings or presence topics.
    pub fn matches(&self, topic: &str) -> bool {
        !self.ignored(topic)
            && (self.pattern.captures(topic).is_some() || self.is_presence_topic(topic))
    }

    /// True if `topic` is this source's presence topic: the broker keeps its retained
    /// messages for late subscribers, as it does native status.
    pub fn is_presence_topic(&self, topic: &str) -> bool {
        self.presence.as_ref().is_some_and(|p| {
            p.pattern
                .captures(topic)
                .is_some_and(|(d, _)| !d.is_empty())
        }) && !self.ignored(topic)
    }

    /// The device a topic of this source (readings or presence) belongs to, if it matches.
    pub fn device_of<'a>(&self, topic: &'a str) -> Option<Cow<'a, str>> {
        if self.ignored(topic) {
            return None;
        }
        self.presence
            .as_ref()
            .and_then(|p| p.pattern.captures(topic))
            .or_else(|| self.pattern.captures(topic))
            .map(|(device, _)| device)
            .filter(|d| !d.is_empty())
    }

    /// Readings or presence from one message; `None` if the topic is not this source's (or
    /// is one it ignores, or is an empty presence message: Zigbee2MQTT clears a renamed
    /// device's retained availability that way).
    pub fn decode<'a>(
        &self,
        topic: &'a str,
        payload: &'a [u8],
        limits: Limits,
    ) -> Option<Result<Message<'a>, Rejected<'a>>> {
        if self.ignored(topic) {
            return None;
        }
        if let Some(presence) = &self.presence {
            if let Some((device, _)) = presence.pattern.captures(topic) {
                return presence.decode(device, payload, limits);
            }
        }
        let (device, metric) = self.pattern.captures(topic)?;
        Some(
            self.decode_captured(device, metric, payload, limits)
                .map(Message::Readings),
        )
    }

    fn decode_captured<'a>(
        &self,
        device: Cow<'a, str>,
        metric: Option<&'a str>,
        payload: &'a [u8],
        limits: Limits,
    ) -> Result<Readings<'a>, Rejected<'a>> {
        if device.is_empty() {
            return Err(Rejected {
                device: None,
                error: DecodeError::NoDevice,
            });
        }
        let reject = |error| Rejected {
            device: Some(device.clone()),
            error,
        };
        if payload.len() > limits.max_payload_bytes {
            return Err(reject(DecodeError::TooLarge {
                len: payload.len(),
                max: limits.max_payload_bytes,
            }));
        }
        let text = std::str::from_utf8(payload)
            .map_err(|_| reject(DecodeError::NotUtf8))?
            .trim();
        let mut readings = Readings {
            device: device.clone(),
            seq: None,
            values: Vec::new(),
            rejected: Vec::new(),
            unmapped: 0,
        };
        match self.payload {
            Payload::Number | Payload::State | Payload::Value => {
                let name: Cow<'a, str> = match (metric, &self.metric) {
                    (Some(m), _) => Cow::Borrowed(m),
                    (None, Some(m)) => Cow::Owned(m.clone()),
                    (None, None) => return Err(reject(DecodeError::NoMetric)),
                };
                if name.is_empty() {
                    return Err(reject(DecodeError::NoMetric));
                }
                check_metric_name(&name).map_err(reject)?;
                if text.is_empty() {
                    return Err(reject(DecodeError::Empty));
                }
                let kind = match self.payload {
                    Payload::Number => FieldKind::Number,
                    Payload::State => FieldKind::State,
                    _ => FieldKind::Any,
                };
                let value =
                    typed(read_leaf(&Leaf::Text(text), &self.values), kind).map_err(reject)?;
                readings.values.push((name, value));
            }
            Payload::Json => {
                let doc: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| reject(DecodeError::BadJson(e.to_string())))?;
                if !doc.is_object() {
                    return Err(reject(DecodeError::BadJson(
                        "expected a JSON object".into(),
                    )));
                }
                let mut leaves = Vec::new();
                flatten(&doc, &mut String::new(), &mut leaves);
                match &self.fields {
                    Some(fields) => {
                        for (path, leaf) in leaves {
                            // A field the map does not list is not read, and counted: a
                            // message of other fields (a button's `action`, a plug's `power`)
                            // is a sign of life, not malformed.
                            let Some(field) = fields.get(&path) else {
                                readings.unmapped += 1;
                                continue;
                            };
                            let name = Cow::Owned(field.metric.clone());
                            if let Err(e) = check_metric_name(&name) {
                                readings.rejected.push((name, e));
                                continue;
                            }
                            match typed(read_leaf(&leaf, &field.values), field.kind) {
                                Ok(v) => readings.values.push((name, v)),
                                Err(e) => readings.rejected.push((name, e)),
                            }
                        }
                    }
                    None => {
                        for (path, leaf) in leaves {
                            // Reserved names are not read here, and neither is text that is
                            // not a known word (a timestamp, a unit), nor nulls and lists.
                            let value = match leaf {
                                _ if path == STATUS_METRIC || path == SEQ_KEY => None,
                                Leaf::Number(Some(n)) => Some(Ok(Value::Number(n))),
                                Leaf::Number(None) => Some(Err(DecodeError::NotFinite)),
                                Leaf::Bool(b) => Some(Ok(Value::Bool(b))),
                                Leaf::Text(t) => match Value::parse(t) {
                                    Ok(v @ (Value::Number(_) | Value::Bool(_))) => Some(Ok(v)),
                                    Ok(Value::Text(w)) if DEFAULT_WORDS.contains(&&*w) => {
                                        Some(Ok(Value::Text(w)))
                                    }
                                    _ => None,
                                },
                                Leaf::Other => None,
                            };
                            let Some(value) = value else {
                                readings.unmapped += 1;
                                continue;
                            };
                            let name = Cow::Owned(path);
                            if let Err(e) = check_metric_name(&name) {
                                readings.rejected.push((name, e));
                                continue;
                            }
                            match value {
                                Ok(v) => readings.values.push((name, v)),
                                Err(e) => readings.rejected.push((name, e)),
                            }
                        }
                    }
                }
                if readings.values.is_empty()
                    && readings.rejected.is_empty()
                    && readings.unmapped == 0
                {
                    return Err(reject(DecodeError::NoReadings));
                }
            }
        }
        Ok(readings)
    }
}

impl Presence {
    fn decode<'a>(
        &self,
        device: Cow<'a, str>,
        payload: &'a [u8],
        limits: Limits,
    ) -> Option<Result<Message<'a>, Rejected<'a>>> {
        if device.is_empty() {
            return Some(Err(Rejected {
                device: None,
                error: DecodeError::NoDevice,
            }));
        }
        let reject = |error| {
            Some(Err(Rejected {
                device: Some(device.clone()),
                error,
            }))
        };
        if payload.len() > limits.max_payload_bytes {
            return reject(DecodeError::TooLarge {
                len: payload.len(),
                max: limits.max_payload_bytes,
            });
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return reject(DecodeError::NotUtf8);
        };
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let word: Cow<'_, str> = if text.starts_with('{') {
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(doc) => match doc.get(&self.field) {
                    Some(serde_json::Value::String(s)) => Cow::Owned(s.clone()),
                    Some(serde_json::Value::Bool(b)) => Cow::Owned(b.to_string()),
                    _ => return reject(DecodeError::BadStatus),
                },
                Err(e) => return reject(DecodeError::BadJson(e.to_string())),
            }
        } else {
            Cow::Borrowed(text)
        };
        let is = |words: &[String]| words.iter().any(|w| w.eq_ignore_ascii_case(word.trim()));
        let online = if is(&self.online) {
            true
        } else if is(&self.offline) {
            false
        } else {
            return reject(DecodeError::BadStatus);
        };
        Some(Ok(Message::Status { device, online }))
    }
}

/// A JSON leaf, or a plain payload.
#[derive(Debug, Clone, PartialEq)]
enum Leaf<'a> {
    Number(Option<f64>),
    Bool(bool),
    Text(&'a str),
    /// `null` or a list.
    Other,
}

/// A leaf as a value, through the value map if there is one: a map is the contract of the
/// field, so a value it does not know is an error.
fn read_leaf(leaf: &Leaf<'_>, map: &ValueMap) -> Result<Value, DecodeError> {
    if !map.is_empty() {
        let key = match leaf {
            Leaf::Number(Some(n)) => Value::Number(*n).map_key(),
            Leaf::Number(None) => return Err(DecodeError::NotFinite),
            Leaf::Bool(b) => b.to_string(),
            Leaf::Text(t) => t.trim().to_owned(),
            Leaf::Other => return Err(DecodeError::NotNumeric),
        };
        return map.get(&key).cloned().ok_or(DecodeError::Unmapped(key));
    }
    match leaf {
        Leaf::Number(Some(n)) => Value::number(*n).map_err(Into::into),
        Leaf::Number(None) => Err(DecodeError::NotFinite),
        Leaf::Bool(b) => Ok(Value::Bool(*b)),
        Leaf::Text(t) => crate::codec::parse_plain(t),
        Leaf::Other => Err(DecodeError::NotNumeric),
    }
}

/// Checks a value against what its field is declared to hold.
fn typed(value: Result<Value, DecodeError>, kind: FieldKind) -> Result<Value, DecodeError> {
    match (value, kind) {
        (Ok(v), FieldKind::Number) if v.is_state() => Err(DecodeError::NotANumber),
        (Err(DecodeError::NotAValue), FieldKind::Number) => Err(DecodeError::NotANumber),
        (Ok(Value::Number(_)), FieldKind::State) => Err(DecodeError::NotAState),
        (v, _) => v,
    }
}

/// Every leaf of `value` with its dotted path.
fn flatten<'d>(value: &'d serde_json::Value, path: &mut String, out: &mut Vec<(String, Leaf<'d>)>) {
    let leaf = match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                flatten(v, path, out);
                path.truncate(len);
            }
            return;
        }
        serde_json::Value::Number(n) => Leaf::Number(n.as_f64().filter(|v| v.is_finite())),
        serde_json::Value::Bool(b) => Leaf::Bool(*b),
        serde_json::Value::String(s) => Leaf::Text(s),
        serde_json::Value::Array(_) | serde_json::Value::Null => Leaf::Other,
    };
    out.push((path.clone(), leaf));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(r: &Readings<'_>) -> Vec<(String, Value)> {
        r.values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn rejections<'a>(r: &'a Readings<'_>) -> Vec<(&'a str, DecodeError)> {
        r.rejected
            .iter()
            .map(|(k, e)| (k.as_ref(), e.clone()))
            .collect()
    }

    fn n(v: f64) -> Value {
        Value::Number(v)
    }

    fn t(s: &str) -> Value {
        Value::parse(s).unwrap()
    }

    /// The readings of one message that must decode.
    fn readings<'a>(s: &Source, topic: &'a str, payload: &'a [u8]) -> Readings<'a> {
        match s.decode(topic, payload, Limits::default()) {
            Some(Ok(Message::Readings(r))) => r,
            other => panic!("{topic}: {other:?}"),
        }
    }

    fn rejected<'a>(s: &Source, topic: &'a str, payload: &'a [u8]) -> Rejected<'a> {
        match s.decode(topic, payload, Limits::default()) {
            Some(Err(e)) => e,
            other => panic!("{topic}: {other:?}"),
        }
    }

    fn source(topic: &str, payload: Payload) -> Source {
        Source::new("s", topic, payload, None, None).unwrap()
    }

    #[test]
    fn patterns_are_checked_and_become_filters() {
        let esphome = source("{device}/sensor/{metric}/state", Payload::Number);
        assert_eq!(esphome.filter(), "+/sensor/+/state");
        assert_eq!(
            source("zigbee2mqtt/{device*}", Payload::Json).filter(),
            "zigbee2mqtt/#"
        );
        for (topic, error) in [
            ("tele/SENSOR", PatternError::Device),
            ("{device}/{device}", PatternError::Device),
            ("{device}/{device*}", PatternError::Device),
            ("{device}/{metric}/{metric}", PatternError::Metric),
            ("tele/{device}/#", PatternError::Level),
            ("tele/dev-{device}", PatternError::Level),
            ("sensors/{device}", PatternError::Native),
        ] {
            assert_eq!(
                Source::new("x", topic, Payload::Number, None, None),
                Err(error),
                "{topic}"
            );
        }
    }

    #[test]
    fn tasmota_nested_json() {
        let s = source("tele/{device}/SENSOR", Payload::Json);
        let payload = br#"{"Time":"2026-11-21T18:05:45","AM2301":{"Temperature":21.5,"Humidity":40.1},"TempUnit":"C"}"#;
        let r = readings(&s, "tele/kitchen/SENSOR", payload);
        assert_eq!(r.device, "kitchen");
        assert_eq!(
            values(&r),
            [
                ("AM2301.Humidity".into(), n(40.1)),
                ("AM2301.Temperature".into(), n(21.5))
            ]
        );
        assert!(r.rejected.is_empty(), "text fields are not errors");
        assert_eq!(r.unmapped, 2, "Time and TempUnit are counted, not read");
        assert!(
            s.decode("tele/kitchen/STATE", payload, Limits::default())
                .is_none()
        );
    }

    #[test]
    fn json_leaves_without_a_map_booleans_and_common_words_are_states() {
        let s = source("zigbee2mqtt/{device}", Payload::Json);
        let r = readings(
            &s,
            "zigbee2mqtt/basement",
            br#"{"water_leak":true,"battery":97,"state":"ON","action":"single","last_seen":null,"list":[1]}"#,
        );
        assert_eq!(
            values(&r),
            [
                ("battery".into(), n(97.0)),
                ("state".into(), t("on")),
                ("water_leak".into(), Value::Bool(true)),
            ]
        );
        assert_eq!(
            r.unmapped, 3,
            "free text, null and a list: counted, not read"
        );
        assert!(r.rejected.is_empty());
    }

    #[test]
    fn reserved_names_are_not_errors_on_foreign_payloads() {
        let s = source("tele/{device}/SENSOR", Payload::Json);
        let payload = br##"{"":1,"a/b":2,"+":3,"#":4,"status":5,"seq":6,"x":{"":7,"y/z":8},
            "AM2301":{"Temperature":21.5},"status.ok":9,"note":{"":"text is ignored"}}"##;
        let r = readings(&s, "tele/k/SENSOR", payload);
        assert_eq!(
            values(&r),
            [
                ("AM2301.Temperature".into(), n(21.5)),
                ("status.ok".into(), n(9.0)),
                ("x.".into(), n(7.0))
            ],
            "nested keys still flatten to their path"
        );
        let rejected: Vec<_> = r.rejected.iter().map(|(k, e)| (k.as_ref(), e)).collect();
        assert_eq!(
            rejected,
            [
                ("", &DecodeError::BadMetricName),
                ("#", &DecodeError::BadMetricName),
                ("+", &DecodeError::BadMetricName),
                ("a/b", &DecodeError::BadMetricName),
                ("x.y/z", &DecodeError::BadMetricName),
            ],
            "status and seq are not errors here: reserved on native topics only"
        );
        assert_eq!(r.unmapped, 3, "status, seq and the text");
    }

    #[test]
    fn a_json_message_with_nothing_at_all_is_rejected() {
        let s = source("tele/{device}/SENSOR", Payload::Json);
        let e = rejected(&s, "tele/k/SENSOR", b"{}");
        assert_eq!(
            (e.device.as_deref(), e.error),
            (Some("k"), DecodeError::NoReadings)
        );
        let r = readings(&s, "tele/k/SENSOR", br#"{"Time":"x","seq":null}"#);
        assert!(r.values.is_empty() && r.rejected.is_empty());
        assert_eq!(r.unmapped, 2, "nothing read, but the device was heard");
    }

    #[test]
    fn plain_sources_refuse_reserved_metric_levels() {
        let s = source("{device}/sensor/{metric}/state", Payload::Number);
        for (topic, error) in [
            ("node/sensor/status/state", DecodeError::ReservedMetric),
            ("node/sensor/seq/state", DecodeError::ReservedSeq),
            ("node/sensor/a+b/state", DecodeError::BadMetricName),
            ("node/sensor//state", DecodeError::NoMetric),
        ] {
            let e = rejected(&s, topic, b"1");
            assert_eq!(
                (e.device.as_deref(), e.error),
                (Some("node"), error),
                "{topic}"
            );
        }
    }

    #[test]
    fn mapped_paths_are_renamed_and_the_rest_ignored() {
        let map = BTreeMap::from([
            ("tC".to_owned(), "temperature".to_owned()),
            ("rh".to_owned(), "humidity".to_owned()),
        ]);
        let s = Source::new(
            "shelly",
            "{device}/status/temperature:0",
            Payload::Json,
            Some(map),
            None,
        )
        .unwrap();
        let r = readings(
            &s,
            "shellyplusht-1/status/temperature:0",
            br#"{"id":0,"tC":21.5,"tF":70.7}"#,
        );
        assert_eq!(values(&r), [("temperature".into(), n(21.5))]);
        assert_eq!(r.unmapped, 2, "id and tF: not listed, counted");
        // A message of unlisted fields only is a sign of life, not malformed.
        let r = readings(&s, "shellyplusht-1/status/temperature:0", br#"{"id":0}"#);
        assert!(r.values.is_empty() && r.rejected.is_empty() && r.unmapped == 1);
    }

    #[test]
    fn plain_payloads_by_kind() {
        let number = source("{device}/sensor/{metric}/state", Payload::Number);
        let r = readings(&number, "garden/sensor/soil_moisture/state", b"41.2");
        assert_eq!(values(&r), [("soil_moisture".into(), n(41.2))]);
        let bad = rejected(&number, "garden/sensor/soil_moisture/state", b"unavailable");
        assert_eq!(
            (bad.device.as_deref(), bad.error),
            (Some("garden"), DecodeError::NotANumber)
        );
        let state = source("{device}/binary_sensor/{metric}/state", Payload::State);
        let r = readings(&state, "door/binary_sensor/contact/state", b"ON");
        assert_eq!(values(&r), [("contact".into(), t("on"))]);
        let bad = rejected(&state, "door/binary_sensor/contact/state", b"12");
        assert_eq!(bad.error, DecodeError::NotAState);
        let either = source("shellies/{device}/sensor/{metric}", Payload::Value);
        for (payload, value) in [(&b"true"[..], Value::Bool(true)), (b"21.5", n(21.5))] {
            let r = readings(&either, "shellies/flood-1/sensor/flood", payload);
            assert_eq!(r.values[0].1, value);
        }
        let fixed = Source::new(
            "relay",
            "shellies/{device}/relay/+/power",
            Payload::Number,
            None,
            Some("power".into()),
        )
        .unwrap();
        let r = readings(&fixed, "shellies/plug-1/relay/0/power", b"12.5");
        assert_eq!(values(&r), [("power".into(), n(12.5))]);
    }

    #[test]
    fn value_maps_turn_product_words_into_values() {
        let contact = Field {
            metric: "door".into(),
            kind: FieldKind::State,
            values: ValueMap::new([("true".into(), t("closed")), ("false".into(), t("open"))]),
        };
        let level = Field {
            metric: "water".into(),
            kind: FieldKind::State,
            values: ValueMap::new([("0".into(), t("dry")), ("1".into(), t("wet"))]),
        };
        let s = source("zigbee2mqtt/{device*}", Payload::Json).with_fields(BTreeMap::from([
            ("contact".to_owned(), contact),
            ("level".to_owned(), level),
        ]));
        let r = readings(&s, "zigbee2mqtt/front", br#"{"contact":false,"level":1}"#);
        assert_eq!(
            values(&r),
            [("door".into(), t("open")), ("water".into(), t("wet"))]
        );
        let r = readings(&s, "zigbee2mqtt/front", br#"{"contact":"ajar","level":2}"#);
        let errors = rejections(&r);
        assert_eq!(
            errors,
            [
                ("door", DecodeError::Unmapped("ajar".into())),
                ("water", DecodeError::Unmapped("2".into())),
            ],
            "a value the map does not know is counted, not guessed"
        );
        let power = source("stat/{device}/POWER", Payload::State).with_values(ValueMap::new([
            ("ON".into(), Value::Bool(true)),
            ("OFF".into(), Value::Bool(false)),
        ]));
        let power = Source {
            metric: Some("power".into()),
            ..power
        };
        assert_eq!(
            readings(&power, "stat/plug/POWER", b"on").values[0].1,
            Value::Bool(true)
        );
    }

    #[test]
    fn typed_fields_refuse_the_other_kind() {
        let s = source("x/{device}", Payload::Json).with_fields(BTreeMap::from([
            (
                "t".to_owned(),
                Field {
                    metric: "t".into(),
                    kind: FieldKind::Number,
                    ..Field::default()
                },
            ),
            (
                "leak".to_owned(),
                Field {
                    metric: "leak".into(),
                    kind: FieldKind::State,
                    ..Field::default()
                },
            ),
        ]));
        let r = readings(&s, "x/d", br#"{"t":"open","leak":3}"#);
        let errors = rejections(&r);
        assert_eq!(
            errors,
            [
                ("leak", DecodeError::NotAState),
                ("t", DecodeError::NotANumber)
            ]
        );
    }

    #[test]
    fn a_device_of_several_levels_is_one_device() {
        let s = source("zigbee2mqtt/{device*}", Payload::Json)
            .with_presence("zigbee2mqtt/{device*}/availability", None, None, None)
            .unwrap()
            .with_ignore([
                "zigbee2mqtt/bridge/#",
                "zigbee2mqtt/{device*}/set",
                "zigbee2mqtt/{device*}/set/+",
            ])
            .unwrap();
        let r = readings(&s, "zigbee2mqtt/basement/leak", br#"{"water_leak":true}"#);
        assert_eq!(r.device, "basement.leak");
        assert_eq!(
            s.device_of("zigbee2mqtt/basement/leak/availability")
                .as_deref(),
            Some("basement.leak")
        );
        for ignored in [
            "zigbee2mqtt/bridge/state",
            "zigbee2mqtt/bridge/devices",
            "zigbee2mqtt/basement/leak/set",
            "zigbee2mqtt/lamp/set/state",
        ] {
            assert!(!s.matches(ignored), "{ignored}");
            assert!(
                s.decode(ignored, b"{}", Limits::default()).is_none(),
                "{ignored}"
            );
        }
        assert!(s.matches("zigbee2mqtt/basement/leak"));
        assert!(
            !s.matches("zigbee2mqtt//x"),
            "an empty level names no device"
        );
    }

    #[test]
    fn presence_words_of_each_product() {
        let status = |s: &Source, topic: &str, payload: &[u8]| match s.decode(
            topic,
            payload,
            Limits::default(),
        ) {
            Some(Ok(Message::Status { device, online })) => Some((device.into_owned(), online)),
            Some(Err(e)) => panic!("{topic} {payload:?}: {e:?}"),
            _ => None,
        };
        let tasmota = source("tele/{device}/SENSOR", Payload::Json)
            .with_presence("tele/{device}/LWT", None, None, None)
            .unwrap();
        let esphome = source("{device}/sensor/{metric}/state", Payload::Number)
            .with_presence("{device}/status", None, None, None)
            .unwrap();
        let z2m = source("zigbee2mqtt/{device*}", Payload::Json)
            .with_presence("zigbee2mqtt/{device*}/availability", None, None, None)
            .unwrap();
        let shelly = source("shellies/{device}/sensor/{metric}", Payload::Value)
            .with_presence("shellies/{device}/online", None, None, None)
            .unwrap();
        let custom = source("x/{device}/data", Payload::Json)
            .with_presence(
                "x/{device}/alive",
                Some("up".into()),
                Some(vec!["yes".into()]),
                Some(vec!["no".into()]),
            )
            .unwrap();
        /// Source, topic, payload, the (device, online) it must give.
        type Case<'a> = (&'a Source, &'a str, &'a [u8], Option<(&'a str, bool)>);
        let cases: &[Case] = &[
            (&tasmota, "tele/plug/LWT", b"Online", Some(("plug", true))),
            (&tasmota, "tele/plug/LWT", b"Offline", Some(("plug", false))),
            (&esphome, "garden/status", b"online", Some(("garden", true))),
            (
                &esphome,
                "garden/status",
                b"offline",
                Some(("garden", false)),
            ),
            (
                &z2m,
                "zigbee2mqtt/hall/leak/availability",
                br#"{"state":"offline"}"#,
                Some(("hall.leak", false)),
            ),
            (
                &z2m,
                "zigbee2mqtt/hall/leak/availability",
                b"online",
                Some(("hall.leak", true)),
            ),
            (&z2m, "zigbee2mqtt/hall/leak/availability", b"", None),
            (
                &shelly,
                "shellies/flood-1/online",
                b"true",
                Some(("flood-1", true)),
            ),
            (
                &shelly,
                "shellies/flood-1/online",
                b"false",
                Some(("flood-1", false)),
            ),
            (&custom, "x/a/alive", br#"{"up":"YES"}"#, Some(("a", true))),
            (&custom, "x/a/alive", b"no", Some(("a", false))),
        ];
        for (s, topic, payload, expected) in cases {
            let got = status(s, topic, payload);
            assert_eq!(
                got.as_ref().map(|(d, o)| (d.as_str(), *o)),
                *expected,
                "{topic} {payload:?}"
            );
        }
        assert!(tasmota.is_presence_topic("tele/plug/LWT"));
        assert!(!tasmota.is_presence_topic("tele/plug/SENSOR"));
        let e = rejected(&tasmota, "tele/plug/LWT", b"maybe");
        assert_eq!(e.error, DecodeError::BadStatus);
    }
}
