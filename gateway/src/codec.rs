//! Sensor messages: bytes to readings. Pure, no I/O, no clock; every input gives a value or an
//! error, never a panic.
//!
//! Three payload forms are understood (see `DESIGN.md`):
//!
//! | topic | payload |
//! |---|---|
//! | `sensors/{device}/{metric}` | plain text: a number (`21.5`) or a state (`open`, `true`) |
//! | `sensors/{device}/{metric}` | JSON `{"v":21.5,"seq":1042}` or `{"v":"open","seq":1043}` |
//! | `sensors/{device}` | JSON object `{"temperature":21.5,"door":"open","leak":false,"seq":1042}` |
//!
//! and one presence form, `sensors/{device}/status` with `online` or `offline`. How text
//! becomes a number or a state is [`Value::parse`]'s rule; JSON booleans are states, JSON
//! strings go through the same rule, JSON `null`, arrays and objects are not values.
//!
//! A metric name is what a topic level can be: never empty, never holding `/`, `+` or `#`.
//! `status` and `seq` are reserved and are never metric names either. Every decoder applies
//! this rule ([`check_metric_name`]) to the names it makes, from topic levels and JSON keys
//! alike, and `config` to the names a configuration gives; a name that breaks it is rejected,
//! never a reading.
//!
//! Foreign topic layouts (Tasmota, ESPHome, ...) are mapped onto these forms elsewhere; this
//! module does not know them.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::value::{Value, ValueError};

/// First topic level of every sensor message.
pub const TOPIC_ROOT: &str = "sensors";

/// The metric name that carries presence instead of a reading.
pub const STATUS_METRIC: &str = "status";

/// The JSON key that carries the device's message counter.
pub const SEQ_KEY: &str = "seq";

/// Limits the decoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Most distinct metrics one device may report; readings of more are malformed.
    pub max_metrics_per_device: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 4096,
            max_metrics_per_device: 256,
        }
    }
}

/// A decoded sensor message, borrowing from the topic and payload it came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    /// One or more readings from one device.
    Readings(Readings<'a>),
    /// The device announced that it is online or (through its last will) offline.
    Status {
        /// Device id from the topic.
        device: Cow<'a, str>,
        /// `true` for `online`.
        online: bool,
    },
}

/// Readings from one message of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Readings<'a> {
    /// Device id from the topic (a source may make it from several levels, hence `Cow`).
    pub device: Cow<'a, str>,
    /// The device's message counter, if it sent one.
    pub seq: Option<u64>,
    /// Metric name and value; every number is finite.
    pub values: Vec<(Cow<'a, str>, Value)>,
    /// Fields of an object payload that were not usable readings. The rest of the message is
    /// still good: one bad field does not cost the others.
    pub rejected: Vec<(Cow<'a, str>, DecodeError)>,
    /// Fields of a foreign payload that are neither numbers nor states it knows (a timestamp,
    /// a unit): not errors, not readings, counted.
    pub unmapped: u32,
}

/// A message that could not be decoded, with the device it came from when the topic named one.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected<'a> {
    /// Device id from the topic, if the topic named one.
    pub device: Option<Cow<'a, str>>,
    /// What was wrong.
    pub error: DecodeError,
}

/// What is wrong with a sensor message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The topic has no device level (`sensors` or `sensors//x`).
    #[error("topic names no device: expected sensors/{{device}}/{{metric}} or sensors/{{device}}")]
    NoDevice,
    /// The topic has an empty metric level (`sensors/dev/`).
    #[error("topic names no metric: expected sensors/{{device}}/{{metric}}")]
    NoMetric,
    /// The topic has levels beyond `sensors/{device}/{metric}`.
    #[error("topic has more than three levels: expected sensors/{{device}}/{{metric}}")]
    TooDeep,
    /// The payload is larger than the configured limit.
    #[error("payload of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The device already reports as many metrics as it may.
    #[error(
        "the device already reports {max} metrics (broker.max_metrics_per_device); readings of a new metric are dropped"
    )]
    TooManyMetrics {
        /// The limit.
        max: usize,
    },
    /// The payload is empty.
    #[error("payload is empty")]
    Empty,
    /// The payload is not UTF-8 text.
    #[error("payload is not UTF-8 text")]
    NotUtf8,
    /// A plain payload is not a number, where only numbers are expected.
    #[error("payload is not a number (expected e.g. 21.5 or {{\"v\":21.5}})")]
    NotANumber,
    /// A plain payload (or a JSON string) is neither a number nor a state.
    #[error(
        "payload is neither a number nor a state (expected e.g. 21.5, open, true, or {{\"v\":21.5}}); a state is a word of at most 64 bytes"
    )]
    NotAValue,
    /// A value is a number, where the configuration expects a state.
    #[error("value is a number, but this field is configured as a state")]
    NotAState,
    /// A state the field's value map does not know.
    #[error("value {0:?} is not in the field's value map")]
    Unmapped(String),
    /// The value is NaN or infinite.
    #[error("value is not finite (NaN or infinity)")]
    NotFinite,
    /// The payload looks like JSON but does not parse.
    #[error("payload is not valid JSON: {0}")]
    BadJson(String),
    /// A `{"v":..}` payload has no `v`.
    #[error("JSON payload on a metric topic needs a \"v\" field (a number or a state)")]
    MissingValue,
    /// A value in a JSON payload is not a number (or, where states are allowed, a state).
    #[error("value is not a number or a state (null, an array or an object)")]
    NotNumeric,
    /// `seq` is not a non-negative integer.
    #[error("\"seq\" must be a non-negative integer")]
    BadSeq,
    /// An object payload holds no fields.
    #[error("JSON object holds no readings")]
    NoReadings,
    /// A status payload is neither `online` nor `offline`.
    #[error("status payload must be \"online\" or \"offline\"")]
    BadStatus,
    /// A topic level or key names the reserved `status` as a metric.
    #[error("\"status\" is reserved for presence and cannot be a metric")]
    ReservedMetric,
    /// A topic level or key names the reserved `seq` as a metric.
    #[error("\"seq\" is reserved for the device's message counter and cannot be a metric")]
    ReservedSeq,
    /// A key (or a topic level) that would name a metric is empty or holds `/`, `+` or `#`.
    #[error("a metric name must not be empty or hold '/', '+' or '#'")]
    BadMetricName,
}

/// Whether `name` can be a metric: not empty, no `/`, `+` or `#` (a metric is one topic
/// level), and not the reserved `status` or `seq`. The error says which rule it breaks.
pub fn check_metric_name(name: &str) -> Result<(), DecodeError> {
    match name {
        STATUS_METRIC => Err(DecodeError::ReservedMetric),
        SEQ_KEY => Err(DecodeError::ReservedSeq),
        _ if name.is_empty() || name.contains(['/', '+', '#']) => Err(DecodeError::BadMetricName),
        _ => Ok(()),
    }
}

/// Decodes one MQTT message published under `sensors/`.
pub fn decode<'a>(
    topic: &'a str,
    payload: &'a [u8],
    limits: Limits,
) -> Result<Message<'a>, Rejected<'a>> {
    // The first level is `sensors`: ingest only subscribes to that.
    let mut levels = topic.split('/').skip(1);
    let device = match levels.next() {
        Some(d) if !d.is_empty() => d,
        _ => return Err(reject(None, DecodeError::NoDevice)),
    };
    let metric = levels.next();
    if levels.next().is_some() {
        return Err(reject(Some(device), DecodeError::TooDeep));
    }
    if payload.len() > limits.max_payload_bytes {
        let error = DecodeError::TooLarge {
            len: payload.len(),
            max: limits.max_payload_bytes,
        };
        return Err(reject(Some(device), error));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| reject(Some(device), DecodeError::NotUtf8))?
        .trim();
    if text.is_empty() {
        return Err(reject(Some(device), DecodeError::Empty));
    }
    match metric {
        None => decode_object(device, text),
        Some("") => Err(reject(Some(device), DecodeError::NoMetric)),
        Some(STATUS_METRIC) => match text {
            "online" => Ok(Message::Status {
                device: Cow::Borrowed(device),
                online: true,
            }),
            "offline" => Ok(Message::Status {
                device: Cow::Borrowed(device),
                online: false,
            }),
            _ => Err(reject(Some(device), DecodeError::BadStatus)),
        },
        Some(metric) => {
            check_metric_name(metric).map_err(|e| reject(Some(device), e))?;
            decode_single(device, metric, text)
        }
    }
}

fn reject(device: Option<&str>, error: DecodeError) -> Rejected<'_> {
    Rejected {
        device: device.map(Cow::Borrowed),
        error,
    }
}

/// `sensors/{device}/{metric}`: plain text (a number or a state) or `{"v":..,"seq":..}`.
fn decode_single<'a>(
    device: &'a str,
    metric: &'a str,
    text: &'a str,
) -> Result<Message<'a>, Rejected<'a>> {
    let (value, seq) = if text.starts_with('{') {
        let fields = parse_fields(text).map_err(|e| reject(Some(device), e))?;
        let mut value = None;
        let mut seq = None;
        for (key, field) in fields {
            match key.as_ref() {
                "v" => value = Some(field.value().map_err(|e| reject(Some(device), e))?),
                SEQ_KEY => seq = Some(field.seq().map_err(|e| reject(Some(device), e))?),
                // Other keys (a timestamp, units) are the device's business.
                _ => {}
            }
        }
        (
            value.ok_or(reject(Some(device), DecodeError::MissingValue))?,
            seq,
        )
    } else {
        (
            parse_plain(text).map_err(|e| reject(Some(device), e))?,
            None,
        )
    };
    Ok(Message::Readings(Readings {
        device: Cow::Borrowed(device),
        seq,
        values: vec![(Cow::Borrowed(metric), value)],
        rejected: Vec::new(),
        unmapped: 0,
    }))
}

/// `sensors/{device}`: a JSON object of metrics.
fn decode_object<'a>(device: &'a str, text: &'a str) -> Result<Message<'a>, Rejected<'a>> {
    if !text.starts_with('{') {
        return Err(reject(
            Some(device),
            DecodeError::BadJson("expected a JSON object of metrics on sensors/{device}".into()),
        ));
    }
    let fields = parse_fields(text).map_err(|e| reject(Some(device), e))?;
    if fields.is_empty() {
        return Err(reject(Some(device), DecodeError::NoReadings));
    }
    let mut readings = Readings {
        device: Cow::Borrowed(device),
        seq: None,
        values: Vec::with_capacity(fields.len()),
        rejected: Vec::new(),
        unmapped: 0,
    };
    for (key, field) in fields {
        if key == SEQ_KEY {
            match field.seq() {
                Ok(seq) => readings.seq = Some(seq),
                Err(e) => readings.rejected.push((key, e)),
            }
        } else if let Err(e) = check_metric_name(&key) {
            readings.rejected.push((key, e));
        } else {
            match field.value() {
                Ok(v) => readings.values.push((key, v)),
                Err(e) => readings.rejected.push((key, e)),
            }
        }
    }
    Ok(Message::Readings(readings))
}

/// Plain text: a number or a state ([`Value::parse`]).
pub fn parse_plain(text: &str) -> Result<Value, DecodeError> {
    Value::parse(text).map_err(DecodeError::from)
}

impl From<ValueError> for DecodeError {
    fn from(e: ValueError) -> Self {
        match e {
            ValueError::Empty => DecodeError::Empty,
            ValueError::NotFinite => DecodeError::NotFinite,
            _ => DecodeError::NotAValue,
        }
    }
}

/// One value of a JSON object, classified without keeping nested data.
#[derive(Debug)]
enum Field<'a> {
    Number(serde_json::Number),
    Bool(bool),
    Text(Cow<'a, str>),
    Other,
}

impl Field<'_> {
    /// The field as a reading's value: a number, a boolean, or text by [`Value::parse`].
    fn value(&self) -> Result<Value, DecodeError> {
        match self {
            Field::Number(n) => {
                Value::number(n.as_f64().ok_or(DecodeError::NotFinite)?).map_err(Into::into)
            }
            Field::Bool(b) => Ok(Value::Bool(*b)),
            Field::Text(t) => parse_plain(t),
            Field::Other => Err(DecodeError::NotNumeric),
        }
    }

    fn seq(&self) -> Result<u64, DecodeError> {
        match self {
            Field::Number(n) => n.as_u64().ok_or(DecodeError::BadSeq),
            _ => Err(DecodeError::BadSeq),
        }
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Field<'de>, E> {
                Ok(Field::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Field<'de>, E> {
                Ok(Field::Number(n.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Field<'de>, E> {
                Ok(Field::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Field<'de>, E> {
                Ok(serde_json::Number::from_f64(n).map_or(Field::Other, Field::Number))
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(s.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Field<'de>, E> {
                Ok(Field::Other)
            }
            // Nested data is read as JSON values (not skipped), so that it is held to the
            // same limits as the rest: nesting depth, numbers in range.
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
                while seq.next_element::<serde_json::Value>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
                while map
                    .next_entry::<serde_json::Value, serde_json::Value>()?
                    .is_some()
                {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(FieldVisitor)
    }
}

/// Keys borrowed from the payload where no escapes force a copy.
struct Fields<'a>(Vec<(Cow<'a, str>, Field<'a>)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    out.push((key.0, map.next_value::<Field>()?));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

fn parse_fields(text: &str) -> Result<Vec<(Cow<'_, str>, Field<'_>)>, DecodeError> {
    serde_json::from_str::<Fields<'_>>(text)
        .map(|f| f.0)
        .map_err(|e| DecodeError::BadJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 64,
            ..Limits::default()
        }
    }

    fn values<'a>(m: &'a Message<'a>) -> Vec<(&'a str, Value)> {
        match m {
            Message::Readings(r) => r
                .values
                .iter()
                .map(|(k, v)| (k.as_ref(), v.clone()))
                .collect(),
            Message::Status { .. } => panic!("expected readings, got {m:?}"),
        }
    }

    #[test]
    fn plain_number() {
        let m = decode("sensors/boiler-1/temperature", b" 21.5\n", limits()).unwrap();
        assert_eq!(values(&m), [("temperature", Value::Number(21.5))]);
    }

    #[test]
    fn value_and_seq_object() {
        let m = decode(
            "sensors/b/temperature",
            br#"{"v":21.5,"seq":1042,"unit":"C"}"#,
            limits(),
        )
        .unwrap();
        assert_eq!(values(&m), [("temperature", Value::Number(21.5))]);
        let Message::Readings(r) = m else {
            unreachable!()
        };
        assert_eq!((r.device.as_ref(), r.seq), ("b", Some(1042)));
    }

    #[test]
    fn object_of_metrics_keeps_good_fields_and_reports_bad_ones() {
        let payload = br#"{"temperature":21.5,"humidity":null,"seq":7,"status":1}"#;
        let m = decode("sensors/b", payload, limits()).unwrap();
        let Message::Readings(r) = m else { panic!() };
        assert_eq!(
            r.values,
            [(Cow::Borrowed("temperature"), Value::Number(21.5))]
        );
        assert_eq!(r.seq, Some(7));
        assert_eq!(
            r.rejected,
            [
                (Cow::Borrowed("humidity"), DecodeError::NotNumeric),
                (Cow::Borrowed("status"), DecodeError::ReservedMetric)
            ]
        );
    }

    #[test]
    fn object_keys_that_cannot_be_metrics_are_rejected_by_name() {
        let payload = br##"{"":1,"a/b":2,"+":3,"#":4,"ok":5,"a.b":6}"##;
        let m = decode("sensors/b", payload, Limits::default()).unwrap();
        assert_eq!(
            values(&m),
            [("ok", Value::Number(5.0)), ("a.b", Value::Number(6.0))]
        );
        let Message::Readings(r) = m else { panic!() };
        let rejected: Vec<_> = r.rejected.iter().map(|(k, e)| (k.as_ref(), e)).collect();
        assert_eq!(
            rejected,
            [
                ("", &DecodeError::BadMetricName),
                ("a/b", &DecodeError::BadMetricName),
                ("+", &DecodeError::BadMetricName),
                ("#", &DecodeError::BadMetricName),
            ]
        );
    }

    #[test]
    fn reserved_names_are_not_metric_topics() {
        // `seq` is the counter inside a payload, `status` is presence: neither is a metric,
        // whatever the payload.
        for (topic, payload, error) in [
            ("sensors/d/seq", &b"1"[..], DecodeError::ReservedSeq),
            (
                "sensors/d/seq",
                br#"{"v":1,"seq":2}"#,
                DecodeError::ReservedSeq,
            ),
            ("sensors/d/status", b"1", DecodeError::BadStatus),
            ("sensors/d/a+b", b"1", DecodeError::BadMetricName),
            ("sensors/d/#", b"1", DecodeError::BadMetricName),
        ] {
            let got = decode(topic, payload, limits()).unwrap_err();
            assert_eq!(
                (got.device.as_deref(), got.error),
                (Some("d"), error),
                "{topic}"
            );
        }
        assert_eq!(
            DecodeError::ReservedSeq.to_string(),
            "\"seq\" is reserved for the device's message counter and cannot be a metric"
        );
    }

    #[test]
    fn the_metric_name_rule() {
        for good in [
            "temperature",
            "AM2301.Temperature",
            "a b",
            "é",
            "Seq",
            "status.x",
        ] {
            assert_eq!(check_metric_name(good), Ok(()), "{good:?}");
        }
        for (bad, error) in [
            ("", DecodeError::BadMetricName),
            ("a/b", DecodeError::BadMetricName),
            ("+", DecodeError::BadMetricName),
            ("t#", DecodeError::BadMetricName),
            ("seq", DecodeError::ReservedSeq),
            ("status", DecodeError::ReservedMetric),
        ] {
            assert_eq!(check_metric_name(bad), Err(error), "{bad:?}");
        }
    }

    #[test]
    fn status_messages() {
        assert_eq!(
            decode("sensors/b/status", b"offline", limits()),
            Ok(Message::Status {
                device: "b".into(),
                online: false
            })
        );
        assert_eq!(
            decode("sensors/b/status", b"gone", limits())
                .unwrap_err()
                .error,
            DecodeError::BadStatus
        );
    }

    #[test]
    fn states_arrive_on_their_own_topics_and_in_objects() {
        let t = |s: &str| Value::Text(s.into());
        /// Topic, payload, the readings it must give.
        type Case<'a> = (&'a str, &'a [u8], &'a [(&'a str, Value)]);
        let cases: &[Case] = &[
            ("sensors/d/door", b"open", &[("door", t("open"))]),
            ("sensors/d/door", b"CLOSED\n", &[("door", t("closed"))]),
            ("sensors/d/leak", b"true", &[("leak", Value::Bool(true))]),
            ("sensors/d/mode", b"heat", &[("mode", t("heat"))]),
            (
                "sensors/d/leak",
                br#"{"v":false,"seq":3}"#,
                &[("leak", Value::Bool(false))],
            ),
            ("sensors/d/door", br#"{"v":"Open"}"#, &[("door", t("open"))]),
            (
                "sensors/d",
                br#"{"leak":true,"door":"open","t":"21.5","seq":4}"#,
                &[
                    ("leak", Value::Bool(true)),
                    ("door", t("open")),
                    ("t", Value::Number(21.5)),
                ],
            ),
        ];
        for (topic, payload, expected) in cases {
            let m = decode(topic, payload, limits()).unwrap();
            assert_eq!(values(&m), *expected, "{topic} {payload:?}");
        }
    }

    #[test]
    fn malformed_inputs_are_rejected_with_their_device() {
        let big = vec![b'1'; 65];
        let cases: Vec<(&str, &[u8], Option<&str>, DecodeError)> = vec![
            ("sensors/d/t", b"[1,2]", Some("d"), DecodeError::NotAValue),
            ("sensors/d/t", b"a\x07b", Some("d"), DecodeError::NotAValue),
            ("sensors/d/t", b"NaN", Some("d"), DecodeError::NotFinite),
            ("sensors/d/t", b"-inf", Some("d"), DecodeError::NotFinite),
            ("sensors/d/t", b"", Some("d"), DecodeError::Empty),
            ("sensors/d/t", b"\xff\xfe", Some("d"), DecodeError::NotUtf8),
            (
                "sensors/d/t",
                &big,
                Some("d"),
                DecodeError::TooLarge { len: 65, max: 64 },
            ),
            (
                "sensors/d/t",
                br#"{"seq":1}"#,
                Some("d"),
                DecodeError::MissingValue,
            ),
            (
                "sensors/d/t",
                br#"{"v":null}"#,
                Some("d"),
                DecodeError::NotNumeric,
            ),
            (
                "sensors/d/t",
                br#"{"v":1,"seq":-1}"#,
                Some("d"),
                DecodeError::BadSeq,
            ),
            ("sensors/d", br#"{}"#, Some("d"), DecodeError::NoReadings),
            ("sensors/d/", b"1", Some("d"), DecodeError::NoMetric),
            ("sensors/d/t/x", b"1", Some("d"), DecodeError::TooDeep),
            ("sensors", b"1", None, DecodeError::NoDevice),
            ("sensors/", b"1", None, DecodeError::NoDevice),
            ("sensors//t", b"1", None, DecodeError::NoDevice),
        ];
        for (topic, payload, device, error) in cases {
            let got = decode(topic, payload, limits()).unwrap_err();
            assert_eq!(
                (got.device.as_deref(), got.error),
                (device, error),
                "{topic} {payload:?}"
            );
        }
    }

    #[test]
    fn bad_json_and_overflowing_numbers() {
        for payload in [&br#"{"v":"#[..], br#"{"v":1e999}"#, b"{nope}"] {
            let got = decode("sensors/d/t", payload, limits()).unwrap_err();
            assert!(
                matches!(got.error, DecodeError::BadJson(_) | DecodeError::NotFinite),
                "{payload:?}: {got:?}"
            );
        }
        let got = decode("sensors/d", b"21.5", limits()).unwrap_err();
        assert!(matches!(got.error, DecodeError::BadJson(_)));
    }

    #[test]
    fn json_numbers_decode_to_the_value_written() {
        // serde_json's default float parser gives this one 2 ulp off; `float_roundtrip` (set
        // in the workspace manifest) makes it exact, like the plain payload's parser.
        let written = "-1.0776287325534397e39";
        let exact: f64 = written.parse().unwrap();
        let v = format!(r#"{{"v":{written}}}"#);
        let m = decode("sensors/d/t", v.as_bytes(), limits()).unwrap();
        assert_eq!(values(&m), [("t", Value::Number(exact))]);
        let object = format!(r#"{{"t":{written}}}"#);
        let m = decode("sensors/d", object.as_bytes(), limits()).unwrap();
        assert_eq!(values(&m), [("t", Value::Number(exact))]);
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let m = decode("sensors/d", br#"{"temp\u0065rature":1}"#, limits()).unwrap();
        assert_eq!(values(&m), [("temperature", Value::Number(1.0))]);
    }
}
