//! The properties every input must satisfy, shared by the property tests (`cargo test`) and the
//! coverage-guided fuzz targets (`fuzz/`, which include this file by path). Each function runs
//! one decoder or parser on one input and panics, with the input in the message, if a property
//! does not hold; a panic inside the code under test is a failure too.
//!
//! The expectations are written from the documented contract (DESIGN.md's payload table, the
//! module docs), not copied from the implementation: where the two disagree, this file is the
//! one that says so.
#![allow(dead_code)] // each user (test binary, fuzz target) takes the part it needs

use std::fmt;
use std::sync::OnceLock;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::Value;
use watchpost::codec::{self, DecodeError, Limits, Message, Readings};
use watchpost::config::{self, Diagnostic, Level};
use watchpost::replay;
use watchpost::rules::{Kind, SilenceAfter, Threshold};
use watchpost::sources::{Payload, Source};
use watchpost::topic::TopicFilter;
use watchpost::value::Value as V;

/// The last millisecond RFC 3339 can name (the end of year 9999): the latest time a readings
/// file may hold, as alert documents print times in RFC 3339.
pub const LAST_RFC3339_MS: u64 = 253_402_300_800_000 - 1;

/// A fuzz input or corpus file for a topic-and-payload target: the topic is the first line, the
/// payload is everything after the first `\n`. `None` if there is no `\n` or the topic is not
/// UTF-8 (MQTT topics are UTF-8; the broker drops others before any decoder sees them).
pub fn split_message(data: &[u8]) -> Option<(&str, &[u8])> {
    let nl = data.iter().position(|b| *b == b'\n')?;
    let topic = std::str::from_utf8(&data[..nl]).ok()?;
    Some((topic, &data[nl + 1..]))
}

// ---------------------------------------------------------------------------------------------
// Native payloads: `codec::decode`.

/// The top-level fields of a JSON object in order, duplicates kept; `None` if `text` is not
/// exactly one JSON object.
pub fn object_fields(text: &str) -> Option<Vec<(String, Value)>> {
    struct Fields(Vec<(String, Value)>);
    impl<'de> Deserialize<'de> for Fields {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Fields;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, Value>()? {
                        out.push((k, v));
                    }
                    Ok(Fields(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Fields>(text).ok().map(|f| f.0)
}

fn is_metric_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '+', '#'])
}

/// What must be said of a name that is to be a metric (the codec's module doc): `None` if it
/// can be one.
fn metric_name_error(name: &str) -> Option<DecodeError> {
    if name == codec::SEQ_KEY {
        Some(DecodeError::ReservedSeq)
    } else if name == codec::STATUS_METRIC {
        Some(DecodeError::ReservedMetric)
    } else if !is_metric_name(name) {
        Some(DecodeError::BadMetricName)
    } else {
        None
    }
}

/// What text is as a reading's value (the value module's table): a number if it reads as one,
/// `true`/`false` in any case, the common words in lower case, other short text as written.
fn model_text(text: &str) -> Result<V, DecodeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(DecodeError::Empty);
    }
    if t.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c)) {
        if let Ok(n) = t.parse::<f64>() {
            return if n.is_finite() {
                Ok(V::Number(n))
            } else {
                Err(DecodeError::NotFinite)
            };
        }
    }
    let lower = t.to_ascii_lowercase();
    match lower.as_str() {
        "true" => Ok(V::Bool(true)),
        "false" => Ok(V::Bool(false)),
        "on" | "off" | "open" | "closed" | "online" | "offline" => Ok(V::Text(lower.into())),
        "nan" | "inf" | "+inf" | "-inf" | "infinity" | "+infinity" | "-infinity" => {
            Err(DecodeError::NotFinite)
        }
        _ if t.len() > 64 || t.starts_with(['{', '[', '"']) || t.chars().any(char::is_control) => {
            Err(DecodeError::NotAValue)
        }
        _ => Ok(V::Text(t.into())),
    }
}

/// What a JSON value is as a reading's value: numbers and booleans as they are, strings as
/// text is ([`model_text`]); nothing else is one.
fn model_json(v: &Value) -> Result<V, DecodeError> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(V::Number(f)),
            _ => Err(DecodeError::NotFinite),
        },
        Value::Bool(b) => Ok(V::Bool(*b)),
        Value::String(s) => model_text(s),
        _ => Err(DecodeError::NotNumeric),
    }
}

/// Every reading of a decoded message is named by a usable metric name.
fn assert_usable_names(r: &Readings<'_>, ctx: &dyn Fn() -> String) {
    for (name, _) in &r.values {
        assert_eq!(
            metric_name_error(name),
            None,
            "{}: the metric {name:?}",
            ctx()
        );
    }
}

/// The readings of an object payload: values, the counter, and the rejected fields.
type ObjectReadings = (Vec<(String, V)>, Option<u64>, Vec<(String, DecodeError)>);

/// What `decode` must give for a payload on `sensors/{device}` (an object of metrics), as
/// (values, seq, rejected) or the error; `text` is the trimmed payload.
fn expected_object(text: &str) -> Result<ObjectReadings, Option<DecodeError>> {
    // `None`: some BadJson, whose message is the JSON library's.
    let fields = object_fields(text)
        .filter(|_| text.starts_with('{'))
        .ok_or(None)?;
    if fields.is_empty() {
        return Err(Some(DecodeError::NoReadings));
    }
    let (mut values, mut seq, mut rejected) = (Vec::new(), None, Vec::new());
    for (key, value) in fields {
        if key == codec::SEQ_KEY {
            match value.as_u64() {
                Some(n) => seq = Some(n),
                None => rejected.push((key, DecodeError::BadSeq)),
            }
        } else if let Some(e) = metric_name_error(&key) {
            rejected.push((key, e));
        } else {
            match model_json(&value) {
                Ok(v) => values.push((key, v)),
                Err(e) => rejected.push((key, e)),
            }
        }
    }
    Ok((values, seq, rejected))
}

/// What `decode` must give for a payload on `sensors/{device}/{metric}`: (value, seq) or the
/// error (`None`: some BadJson).
fn expected_single(text: &str) -> Result<(V, Option<u64>), Option<DecodeError>> {
    if !text.starts_with('{') {
        return model_text(text).map(|v| (v, None)).map_err(Some);
    }
    let fields = object_fields(text).ok_or(None)?;
    let (mut value, mut seq) = (None, None);
    // The first unusable `v` or `seq` decides; otherwise the last of each counts.
    for (key, field) in fields {
        match key.as_str() {
            "v" => value = Some(model_json(&field).map_err(Some)?),
            codec::SEQ_KEY => match field.as_u64() {
                Some(n) => seq = Some(n),
                None => return Err(Some(DecodeError::BadSeq)),
            },
            _ => {}
        }
    }
    Ok((value.ok_or(Some(DecodeError::MissingValue))?, seq))
}

/// `codec::decode` of one message: never panics; an error names the device iff the topic does
/// and says what is really wrong; a success holds exactly what the payload says, every field
/// of an object accounted for once (a reading, the counter, or a rejection with its reason);
/// surrounding whitespace and a limit anywhere at or above the size change nothing.
pub fn codec(topic: &str, payload: &[u8]) {
    let limits = Limits::default();
    let got = codec::decode(topic, payload, limits);
    let ctx = || {
        format!(
            "topic {topic:?}, payload {:?}",
            String::from_utf8_lossy(payload)
        )
    };
    let mut levels = topic.split('/').skip(1);
    let device = levels.next().filter(|d| !d.is_empty());
    let metric = levels.next();
    let too_deep = levels.next().is_some();
    let text = std::str::from_utf8(payload).ok().map(str::trim);

    // What must happen, in the order the contract checks it.
    let expected: Result<(), Option<DecodeError>> = if device.is_none() {
        Err(Some(DecodeError::NoDevice))
    } else if too_deep {
        Err(Some(DecodeError::TooDeep))
    } else if payload.len() > limits.max_payload_bytes {
        Err(Some(DecodeError::TooLarge {
            len: payload.len(),
            max: limits.max_payload_bytes,
        }))
    } else if text.is_none() {
        Err(Some(DecodeError::NotUtf8))
    } else if text == Some("") {
        Err(Some(DecodeError::Empty))
    } else if metric == Some("") {
        Err(Some(DecodeError::NoMetric))
    } else if let Some(e) = metric
        .filter(|m| *m != codec::STATUS_METRIC)
        .and_then(metric_name_error)
    {
        Err(Some(e))
    } else {
        Ok(())
    };
    let text = text.unwrap_or("");
    match (&got, expected) {
        (Err(r), Err(e)) => {
            assert_eq!(r.device.as_deref(), device, "{}", ctx());
            assert_eq!(Some(&r.error), e.as_ref(), "{}", ctx());
        }
        (Ok(m), Err(e)) => panic!("{}: decoded {m:?}, expected {e:?}", ctx()),
        (_, Ok(())) => match metric {
            None => match (expected_object(text), &got) {
                (Ok((values, seq, rejected)), Ok(Message::Readings(r))) => {
                    assert_eq!(r.device.as_ref(), device.unwrap(), "{}", ctx());
                    assert_eq!(owned_values(r), values, "{}", ctx());
                    assert_eq!(r.seq, seq, "{}", ctx());
                    assert_eq!(owned_rejected(r), rejected, "{}", ctx());
                }
                (Err(e), Err(r)) => {
                    assert_eq!(r.device.as_deref(), device, "{}", ctx());
                    match e {
                        Some(e) => assert_eq!(r.error, e, "{}", ctx()),
                        None => assert!(
                            matches!(r.error, DecodeError::BadJson(_)),
                            "{}: {r:?}",
                            ctx()
                        ),
                    }
                }
                (e, g) => panic!("{}: decoded {g:?}, expected {e:?}", ctx()),
            },
            Some(codec::STATUS_METRIC) => {
                let online = match text {
                    "online" => Some(true),
                    "offline" => Some(false),
                    _ => None,
                };
                match (&got, online) {
                    (
                        Ok(Message::Status {
                            device: d,
                            online: o,
                        }),
                        Some(online),
                    ) => {
                        assert_eq!((Some(d.as_ref()), *o), (device, online), "{}", ctx())
                    }
                    (Err(r), None) => {
                        assert_eq!(
                            (r.device.as_deref(), &r.error),
                            (device, &DecodeError::BadStatus)
                        )
                    }
                    (g, e) => panic!("{}: decoded {g:?}, expected online = {e:?}", ctx()),
                }
            }
            Some(metric) => match (expected_single(text), &got) {
                (Ok((value, seq)), Ok(Message::Readings(r))) => {
                    assert_eq!(r.device.as_ref(), device.unwrap(), "{}", ctx());
                    assert_eq!(owned_values(r), [(metric.to_owned(), value)], "{}", ctx());
                    assert_eq!(r.seq, seq, "{}", ctx());
                    assert!(r.rejected.is_empty(), "{}", ctx());
                }
                (Err(e), Err(r)) => {
                    assert_eq!(r.device.as_deref(), device, "{}", ctx());
                    match e {
                        Some(e) => assert_eq!(r.error, e, "{}", ctx()),
                        None => assert!(
                            matches!(r.error, DecodeError::BadJson(_)),
                            "{}: {r:?}",
                            ctx()
                        ),
                    }
                }
                (e, g) => panic!("{}: decoded {g:?}, expected {e:?}", ctx()),
            },
        },
    }
    if let Ok(Message::Readings(r)) = &got {
        assert!(
            r.values
                .iter()
                .all(|(_, v)| v.as_number().is_none_or(f64::is_finite)),
            "{}",
            ctx()
        );
        assert_usable_names(r, &ctx);
    }

    // Metamorphic: whitespace around the payload, and the exact limit, change nothing.
    if payload.len() + 3 <= limits.max_payload_bytes {
        let mut padded = b" \t".to_vec();
        padded.extend_from_slice(payload);
        padded.push(b'\n');
        let again = codec::decode(topic, &padded, limits);
        assert_eq!(
            again,
            got,
            "{}: surrounding whitespace changed the result",
            ctx()
        );
    }
    if payload.len() <= limits.max_payload_bytes {
        let exact = Limits {
            max_payload_bytes: payload.len(),
            ..limits
        };
        assert_eq!(codec::decode(topic, payload, exact), got, "{}", ctx());
    }
}

fn owned_values(r: &Readings<'_>) -> Vec<(String, V)> {
    r.values
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn owned_rejected(r: &Readings<'_>) -> Vec<(String, DecodeError)> {
    r.rejected
        .iter()
        .map(|(k, e)| (k.to_string(), e.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Foreign payloads: `sources::Source::decode`.

/// A source of the test fleet and where its topic pattern keeps the device and metric.
pub struct FleetSource {
    /// The checked source.
    pub source: Source,
    /// The topic pattern it was made from.
    pub pattern: &'static str,
    device_level: usize,
    metric_level: Option<usize>,
}

/// The sources the shipped example configurations use (Tasmota, ESPHome, Shelly Gen1 and
/// Gen2), plus Tasmota without a `metrics` map, so both JSON modes are exercised.
pub fn fleet() -> &'static [FleetSource] {
    static FLEET: OnceLock<Vec<FleetSource>> = OnceLock::new();
    FLEET.get_or_init(|| {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let defs: Vec<(&'static str, Payload, _, Option<String>)> = vec![
            ("tele/{device}/SENSOR", Payload::Json, None, None),
            (
                "tasmota/{device}/SENSOR",
                Payload::Json,
                map(&[
                    ("BME280.Temperature", "temperature"),
                    ("BME280.Humidity", "humidity"),
                    ("BME280.Pressure", "pressure"),
                    ("AM2301.Temperature", "temperature"),
                    ("DS18B20.Temperature", "temperature"),
                    ("ENERGY.Power", "power"),
                    ("ENERGY.Voltage", "voltage"),
                ]),
                None,
            ),
            (
                "{device}/sensor/{metric}/state",
                Payload::Number,
                None,
                None,
            ),
            (
                "shellies/{device}/sensor/{metric}",
                Payload::Number,
                None,
                None,
            ),
            (
                "{device}/status/temperature:0",
                Payload::Json,
                map(&[("tC", "temperature")]),
                None,
            ),
            (
                "{device}/status/devicepower:0",
                Payload::Json,
                map(&[("battery.percent", "battery")]),
                None,
            ),
            (
                "shellies/{device}/relay/+/power",
                Payload::Number,
                None,
                Some("power".to_owned()),
            ),
        ];
        defs.into_iter()
            .map(|(pattern, payload, metrics, metric)| {
                let levels: Vec<&str> = pattern.split('/').collect();
                FleetSource {
                    source: Source::new(pattern, pattern, payload, metrics, metric)
                        .expect("the fleet's patterns are valid"),
                    pattern,
                    device_level: levels.iter().position(|l| *l == "{device}").unwrap(),
                    metric_level: levels.iter().position(|l| *l == "{metric}"),
                }
            })
            .collect()
    })
}

/// Every leaf of a JSON value with its dotted path (arrays are leaves, not entered).
fn leaves(value: &Value, path: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(v, p, out);
            }
        }
        leaf => out.push((path, leaf.clone())),
    }
}

/// `Source::decode` of one message, for every source of the fleet: never panics; a source
/// claims a topic exactly when its subscription filter matches it; an error names the device
/// and says what is really wrong; a success gives one reading per numeric leaf (or per mapped
/// leaf, renamed, with unusable mapped leaves rejected), every value finite and every name
/// one a metric can have (numbers under other names are rejected with the reason); surrounding
/// whitespace changes nothing.
pub fn sources(topic: &str, payload: &[u8]) {
    let limits = Limits::default();
    let ctx = |s: &FleetSource| {
        format!(
            "source {:?}, topic {topic:?}, payload {:?}",
            s.pattern,
            String::from_utf8_lossy(payload)
        )
    };
    for s in fleet() {
        let got = s.source.decode(topic, payload, limits);
        let filter = TopicFilter::new(&s.source.filter()).expect("a source's filter is valid");
        if !topic.starts_with('$') {
            assert_eq!(got.is_some(), filter.matches(topic), "{}", ctx(s));
        }
        let Some(got) = got else { continue };
        if payload.len() + 3 <= limits.max_payload_bytes {
            let mut padded = b"\r\n ".to_vec();
            padded.extend_from_slice(payload);
            let again = s.source.decode(topic, &padded, limits);
            assert_eq!(
                again.as_ref(),
                Some(&got),
                "{}: surrounding whitespace changed the result",
                ctx(s)
            );
        }
        // The fleet has no presence topics: every message is readings or an error.
        let got = got.map(|m| match m {
            Message::Readings(r) => r,
            other => panic!("{}: {other:?}", ctx(s)),
        });
        let levels: Vec<&str> = topic.split('/').collect();
        let device = levels[s.device_level];
        let text = std::str::from_utf8(payload).ok().map(str::trim);
        let metric = match s.metric_level {
            Some(i) => Some(levels[i].to_owned()),
            None => s.source.metric.clone(),
        };
        let ctx = ctx(s);
        let expected_err = if device.is_empty() {
            Some(DecodeError::NoDevice)
        } else if payload.len() > limits.max_payload_bytes {
            Some(DecodeError::TooLarge {
                len: payload.len(),
                max: limits.max_payload_bytes,
            })
        } else if text.is_none() {
            Some(DecodeError::NotUtf8)
        } else {
            None
        };
        let text = text.unwrap_or("");
        if let Some(e) = expected_err {
            let r = got.expect_err(&ctx);
            let named = (!device.is_empty()).then_some(device);
            assert_eq!((r.device.as_deref(), r.error), (named, e), "{ctx}");
            continue;
        }
        match s.source.payload {
            Payload::Number | Payload::State | Payload::Value => {
                let payload = s.source.payload;
                let expected = match metric.as_deref() {
                    Some("") | None => Err(DecodeError::NoMetric),
                    Some(m) => match (metric_name_error(m), model_text(text)) {
                        (Some(e), _) => Err(e),
                        (None, Err(DecodeError::NotAValue)) if payload == Payload::Number => {
                            Err(DecodeError::NotANumber)
                        }
                        (None, Err(e)) => Err(e),
                        (None, Ok(v)) if payload == Payload::Number && v.is_state() => {
                            Err(DecodeError::NotANumber)
                        }
                        (None, Ok(V::Number(_))) if payload == Payload::State => {
                            Err(DecodeError::NotAState)
                        }
                        (None, Ok(v)) => Ok(vec![(m.to_owned(), v)]),
                    },
                };
                match (got, expected) {
                    (Ok(r), Ok(values)) => {
                        assert_usable_names(&r, &|| ctx.clone());
                        assert_eq!((r.device.as_ref(), r.seq), (device, None), "{ctx}");
                        assert_eq!(owned_values(&r), values, "{ctx}");
                        assert!(r.rejected.is_empty(), "{ctx}");
                    }
                    (Err(r), Err(e)) => {
                        assert_eq!((r.device.as_deref(), r.error), (Some(device), e), "{ctx}")
                    }
                    (g, e) => panic!("{ctx}: decoded {g:?}, expected {e:?}"),
                }
            }
            Payload::Json => {
                let doc = serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(Value::is_object);
                let Some(doc) = doc else {
                    let r = got.expect_err(&ctx);
                    assert_eq!(r.device.as_deref(), Some(device), "{ctx}");
                    assert!(matches!(r.error, DecodeError::BadJson(_)), "{ctx}: {r:?}");
                    continue;
                };
                let mut all = Vec::new();
                leaves(&doc, String::new(), &mut all);
                let (mut values, mut rejected, mut unmapped) = (Vec::new(), Vec::new(), 0);
                for (path, value) in all {
                    let (name, value) = match &s.source.fields {
                        // Without a map: numbers, booleans, numbers and common words in
                        // strings; the rest (and the reserved names) is counted, not read.
                        None => {
                            let taken = match (&value, model_json(&value)) {
                                _ if path == codec::STATUS_METRIC || path == codec::SEQ_KEY => None,
                                (Value::String(_), Ok(V::Text(t)))
                                    if !["on", "off", "open", "closed", "online", "offline"]
                                        .contains(&&*t) =>
                                {
                                    None
                                }
                                (Value::String(_), Err(_)) => None,
                                (Value::Null | Value::Array(_), _) => None,
                                (_, v) => Some(v),
                            };
                            match taken {
                                Some(v) => (path, v),
                                None => {
                                    unmapped += 1;
                                    continue;
                                }
                            }
                        }
                        // With a map: the listed fields; the others are counted, not read.
                        Some(map) => match map.get(&path) {
                            Some(f) => (f.metric.clone(), model_json(&value)),
                            None => {
                                unmapped += 1;
                                continue;
                            }
                        },
                    };
                    // A name that cannot be a metric is rejected before its value counts.
                    if let Some(e) = metric_name_error(&name) {
                        rejected.push((name, e));
                        continue;
                    }
                    match value {
                        Ok(v) => values.push((name, v)),
                        Err(e) => rejected.push((name, e)),
                    }
                }
                if values.is_empty() && rejected.is_empty() && unmapped == 0 {
                    let r = got.expect_err(&ctx);
                    assert_eq!(
                        (r.device.as_deref(), r.error),
                        (Some(device), DecodeError::NoReadings)
                    );
                    continue;
                }
                let r = got.unwrap_or_else(|e| panic!("{ctx}: rejected {e:?}"));
                assert_usable_names(&r, &|| ctx.clone());
                assert_eq!((r.device.as_ref(), r.seq), (device, None), "{ctx}");
                assert_eq!(owned_values(&r), values, "{ctx}");
                assert_eq!(owned_rejected(&r), rejected, "{ctx}");
                assert_eq!(r.unmapped, unmapped, "{ctx}");
                if let Some(map) = &s.source.fields {
                    assert!(
                        r.values
                            .iter()
                            .all(|(m, _)| map.values().any(|f| &f.metric == m)),
                        "{ctx}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration: `config::parse`.

/// The name configurations are parsed under.
pub const CONFIG_NAME: &str = "fuzz.toml";

/// Lines of `source` as the diagnostics count them (1-based), as (line, its text without the
/// line break); a final line break starts one more, empty line.
fn line_texts(source: &str) -> Vec<&str> {
    source
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect()
}

/// A diagnostic points into the file: a line that exists, a column (in characters, 1-based)
/// within that line or just after its end, the file's name, and a message.
fn check_position(source: &str, d: &Diagnostic) {
    let lines = line_texts(source);
    assert!(
        d.line >= 1 && d.line <= lines.len(),
        "{d:?}: line outside the file of {} lines\n{source:?}",
        lines.len()
    );
    // A column may point at a line's '\r' (one past the text) or, for "end of input", just
    // after the last character.
    let width = lines[d.line - 1].chars().count() + 1;
    let raw_width = source
        .split('\n')
        .nth(d.line - 1)
        .map_or(0, |l| l.chars().count())
        + 1;
    assert!(
        d.column >= 1 && d.column <= width.max(raw_width),
        "{d:?}: column outside line {} of {width} characters\n{source:?}",
        d.line
    );
    assert_eq!(d.file, CONFIG_NAME);
    assert!(!d.message.trim().is_empty(), "{d:?}: empty message");
    let shown = d.to_string();
    let level = match d.level {
        Level::Error => "error",
        Level::Warning => "warning",
    };
    let head = format!("{}:{}:{}: {level}: ", d.file, d.line, d.column);
    assert!(
        shown.starts_with(&head),
        "{shown:?} does not start with {head:?}"
    );
}

fn sorted(ds: &[Diagnostic]) -> bool {
    ds.windows(2)
        .all(|w| (w[0].line, w[0].column) <= (w[1].line, w[1].column))
}

/// The outcome of a parse, in a form two parses can be compared by.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Loaded: the configuration (as its `Debug` text) and the warnings.
    Ok(String, Vec<Diagnostic>),
    /// Refused: the errors.
    Err(Vec<Diagnostic>),
}

/// Parses `source` and checks what holds for every outcome.
pub fn parse_config(source: &str) -> Outcome {
    match config::parse(source, CONFIG_NAME) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                assert_eq!(w.level, Level::Warning, "{w:?}");
                check_position(source, w);
            }
            assert!(sorted(&loaded.warnings), "{:?}", loaded.warnings);
            check_config_sound(&loaded.config, source);
            Outcome::Ok(format!("{:?}", loaded.config), loaded.warnings)
        }
        Err(e) => {
            assert!(
                !e.errors.is_empty(),
                "an error with no diagnostics\n{source:?}"
            );
            for d in &e.errors {
                assert_eq!(d.level, Level::Error, "{d:?}");
                check_position(source, d);
            }
            assert!(sorted(&e.errors), "{:?}", e.errors);
            Outcome::Err(e.errors)
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn threshold_sound(t: &Threshold, source: &str) {
    for v in [t.above, t.below, t.clear_below, t.clear_above]
        .into_iter()
        .flatten()
    {
        assert!(v.is_finite(), "{t:?}\n{source:?}");
    }
    assert!(t.above.is_some() || t.below.is_some(), "{t:?}\n{source:?}");
    if let (Some(a), Some(b)) = (t.above, t.below) {
        assert!(b < a, "{t:?}\n{source:?}");
    }
    if let (Some(a), Some(c)) = (t.above, t.clear_below) {
        assert!(c <= a, "inverted hysteresis {t:?}\n{source:?}");
    }
    if let (Some(b), Some(c)) = (t.below, t.clear_above) {
        assert!(c >= b, "inverted hysteresis {t:?}\n{source:?}");
    }
}

/// What the checker promises about a configuration it accepts.
fn check_config_sound(c: &config::Config, source: &str) {
    let ctx = || format!("accepted\n{source:?}");
    assert!(is_name(&c.gateway.id), "{}", ctx());
    assert!(!c.gateway.data_dir.as_os_str().is_empty(), "{}", ctx());
    let limits = c.broker.limits.max_payload_bytes;
    assert!((16..=1024 * 1024).contains(&limits), "{}", ctx());
    assert!(c.broker.max_connections >= 1, "{}", ctx());
    assert!(c.broker.limits.max_metrics_per_device >= 1, "{}", ctx());
    if let Some(tls) = &c.broker.tls {
        assert!(
            tls.listen.port() == 0 || tls.listen != c.broker.listen,
            "{}",
            ctx()
        );
    }
    let whole_seconds =
        |d: std::time::Duration, max: u64| d.subsec_nanos() == 0 && d.as_secs() <= max;
    if let Some(k) = c.broker.max_keep_alive {
        assert!(
            k.as_secs() >= 1 && whole_seconds(k, u16::MAX.into()),
            "{}",
            ctx()
        );
    }
    assert!(c.broker.receive_maximum >= 1, "{}", ctx());
    assert!(
        whole_seconds(c.broker.max_session_expiry, u32::MAX.into()),
        "{}",
        ctx()
    );
    assert!(c.broker.max_queued_messages >= 1, "{}", ctx());
    assert!(c.broker.max_queued_bytes >= 1024, "{}", ctx());
    assert!(c.broker.max_retained_messages >= 1, "{}", ctx());
    assert!(c.broker.max_retained_bytes >= 1024, "{}", ctx());
    for f in &c.broker.refuse_subscriptions {
        assert!(TopicFilter::new(f).is_ok(), "{}", ctx());
    }
    assert!(
        c.history.window >= std::time::Duration::from_secs(1),
        "{}",
        ctx()
    );
    assert!(c.history.max_db_bytes >= 1024 * 1024, "{}", ctx());
    if let Some(u) = &c.uplink {
        assert!(!u.host.is_empty() && u.port != 0, "{}", ctx());
        assert!(is_name(&u.client_id), "{}", ctx());
        assert!(
            !u.topic_prefix.is_empty()
                && !u.topic_prefix.contains(['+', '#', '\0'])
                && !u.topic_prefix.starts_with('/')
                && !u.topic_prefix.ends_with('/'),
            "{}",
            ctx()
        );
        let k = u.keep_alive;
        assert!(
            k.as_secs() >= 1 && k.as_secs() <= 65535 && k.subsec_nanos() == 0,
            "{}",
            ctx()
        );
        if let Some(s) = &u.summaries {
            assert!(s.interval.as_secs() >= 1, "{}", ctx());
            for (i, m) in s.metrics.iter().enumerate() {
                assert_eq!(metric_name_error(m), None, "{}", ctx());
                assert!(!s.metrics[..i].contains(m), "{}", ctx());
            }
        }
    }
    for (i, r) in c.rules.iter().enumerate() {
        assert!(is_name(&r.name), "{}", ctx());
        assert!(c.rules[..i].iter().all(|o| o.name != r.name), "{}", ctx());
        assert!(r.labels.keys().all(|k| is_name(k)), "{}", ctx());
        assert!(TopicFilter::new(r.filter.as_str()).is_ok(), "{}", ctx());
        if let Some(n) = r.renotify {
            assert!(n.as_secs() >= 1, "{}", ctx());
        }
        match &r.kind {
            Kind::Threshold(t) => threshold_sound(t, source),
            Kind::Rate {
                threshold,
                window,
                per_seconds,
            } => {
                threshold_sound(threshold, source);
                assert!(
                    window.as_secs() >= 1 && [1.0, 60.0].contains(per_seconds),
                    "{}",
                    ctx()
                );
            }
            Kind::Deviation {
                threshold,
                window,
                min_samples,
            } => {
                threshold_sound(threshold, source);
                assert!(threshold.above.is_some_and(|a| a > 0.0), "{}", ctx());
                assert!(window.as_secs() >= 1 && *min_samples >= 2, "{}", ctx());
            }
            Kind::Silence { after, .. } => match after {
                SilenceAfter::Fixed(d) => assert!(d.as_secs() >= 1, "{}", ctx()),
                SilenceAfter::Learned {
                    factor,
                    min_samples,
                } => {
                    assert!(
                        factor.is_finite() && *factor > 1.0 && *min_samples >= 2,
                        "{}",
                        ctx()
                    )
                }
            },
            Kind::Presence { .. } => {
                assert!(r.filter.can_match_pattern("sensors/+/status"), "{}", ctx())
            }
            // Every value a state rule names is one a reading can have: what text gives.
            Kind::State(test) => {
                assert!(!test.values().is_empty(), "{}", ctx());
                for v in test.values() {
                    let back = model_text(&v.to_string());
                    assert_eq!(back.as_ref(), Ok(v), "{}", ctx());
                }
            }
            Kind::Flapping { window, .. } => assert!(window.as_secs() >= 1, "{}", ctx()),
        }
    }
    for (i, s) in c.sources.iter().enumerate() {
        assert!(is_name(&s.name), "{}", ctx());
        assert!(c.sources[..i].iter().all(|o| o.name != s.name), "{}", ctx());
        assert!(
            !s.filter().starts_with("sensors/") && s.filter() != "sensors",
            "{}",
            ctx()
        );
        let usable = |m: &String| metric_name_error(m).is_none();
        assert!(
            s.fields
                .iter()
                .flat_map(|m| m.values())
                .all(|f| usable(&f.metric)),
            "{}",
            ctx()
        );
        assert!(s.metric.iter().all(usable), "{}", ctx());
        match s.payload {
            Payload::Number | Payload::State | Payload::Value => assert!(
                s.fields.is_none() && (s.has_metric_level() || s.metric.is_some()),
                "{}",
                ctx()
            ),
            Payload::Json => assert!(!s.has_metric_level(), "{}", ctx()),
        }
    }
}

/// `config::parse` of one text: never panics; every diagnostic points into the file (line and
/// character column, 1-based) and the list is in file order; an accepted configuration keeps
/// the checker's promises. Then two layout-only edits: a blank line before the file moves every
/// located diagnostic down one line and changes nothing else, and indenting every line (where
/// no multi-line string makes indentation content) moves columns right by the indentation.
pub fn config(source: &str) {
    let outcome = parse_config(source);
    // A byte-order mark is only allowed first; anything before it changes the file's meaning.
    if source.starts_with('\u{feff}') {
        return;
    }
    let down = parse_config(&format!("\n{source}"));
    assert_moved(&outcome, &down, source, "a blank first line", |(l, c)| {
        vec![(l + 1, c)]
    });
    if !source.contains("\"\"\"") && !source.contains("'''") {
        let indented: String = source
            .split_inclusive('\n')
            .map(|l| format!("  {l}"))
            .collect();
        let right = parse_config(&indented);
        assert_moved(
            &outcome,
            &right,
            source,
            "indenting every line",
            |(l, c)| {
                // A position at the very end (after a final line break) is on a line with no
                // indentation of its own.
                vec![(l, c + 2), (l, c)]
            },
        );
    }
}

/// `after` is `before` with every diagnostic moved as `moved` allows; diagnostics that point
/// at the start of the file (a missing section: no position of their own) may stay there.
fn assert_moved(
    before: &Outcome,
    after: &Outcome,
    source: &str,
    edit: &str,
    moved: impl Fn((usize, usize)) -> Vec<(usize, usize)>,
) {
    let (b, a) = match (before, after) {
        (Outcome::Ok(cb, wb), Outcome::Ok(ca, wa)) => {
            assert_eq!(cb, ca, "{edit} changed the configuration\n{source:?}");
            (wb, wa)
        }
        (Outcome::Err(eb), Outcome::Err(ea)) => (eb, ea),
        _ => panic!("{edit} changed the outcome\n{source:?}\nbefore: {before:?}\nafter: {after:?}"),
    };
    let strip = |d: &Diagnostic| (d.message.clone(), d.help.clone());
    let mut bm: Vec<_> = b.iter().map(strip).collect();
    let mut am: Vec<_> = a.iter().map(strip).collect();
    bm.sort();
    am.sort();
    assert_eq!(bm, am, "{edit} changed the diagnostics\n{source:?}");
    for d in b {
        let options = moved((d.line, d.column));
        let found = a.iter().any(|n| {
            strip(n) == strip(d)
                && (options.contains(&(n.line, n.column)) || (d.line, d.column) == (1, 1))
        });
        assert!(
            found,
            "{edit}: {d:?} did not move to one of {options:?}\n{source:?}\nafter: {a:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Recorded readings and expected alerts: `replay::parse_readings`, `replay::parse_expected`.

/// The line numbers (1-based) `parse_readings` reads: not blank, not a `#` comment.
fn data_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, _)| i + 1)
        .collect()
}

/// The line number an error message starts with (`line N: ...`).
fn error_line(e: &str) -> usize {
    e.strip_prefix("line ")
        .and_then(|r| r.split_once(':'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{e:?} does not start with `line N:`"))
}

/// A configuration with a rule of every kind, for replaying readings through.
pub fn replay_config() -> &'static config::Config {
    static CONFIG: OnceLock<config::Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let src = "[gateway]\nid = \"fuzz\"\n[uplink]\nurl = \"mqtt://up\"\nforward = [\"critical\", \"warning\", \"info\"]\n\
                   [[rule]]\nname = \"hot\"\nmatch = \"sensors/+/+\"\nabove = 90\nclear_below = 80\nfor = \"10s\"\ncooldown = \"1m\"\nseverity = \"critical\"\n\
                   [[rule]]\nname = \"cold\"\nmatch = \"sensors/+/+\"\nbelow = 0\n\
                   [[rule]]\nname = \"climb\"\nmatch = \"sensors/+/+\"\nrate_above = 5\nwindow = \"1m\"\n\
                   [[rule]]\nname = \"odd\"\nmatch = \"sensors/+/+\"\ndeviation_above = 3\nmin_samples = 3\n\
                   [[rule]]\nname = \"quiet\"\nmatch = \"sensors/+/+\"\nsilent_for = \"1m\"\n\
                   [[rule]]\nname = \"learned\"\nmatch = \"sensors/+/+\"\nsilent_factor = 2\nmin_samples = 2\nscope = \"device\"\n";
        config::parse(src, "replay.toml").expect("the replay configuration is valid").config
    })
}

/// `parse_readings` of one text: never panics; success gives one reading per data line (the
/// header aside), each with a device, a metric, a finite value and a time no later than the end
/// of year 9999; failure names each bad line
/// once, in order, by a number that is a data line of the text. Readings it accepts replay
/// through every rule kind without a panic.
pub fn readings(text: &str) {
    let lines = data_lines(text);
    match replay::parse_readings(text) {
        Ok(rs) => {
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'));
            let header = first.is_some_and(|l| {
                !l.starts_with('{')
                    && l.split(',')
                        .next()
                        .is_some_and(|c| c.trim().eq_ignore_ascii_case("time"))
            });
            assert_eq!(rs.len() + usize::from(header), lines.len(), "{text:?}");
            for r in &rs {
                assert!(
                    !r.device.is_empty() && !r.metric.is_empty(),
                    "{r:?} from {text:?}"
                );
                assert!(
                    r.value.as_number().is_none_or(f64::is_finite),
                    "{r:?} from {text:?}"
                );
                assert!(r.at <= LAST_RFC3339_MS, "{r:?} from {text:?}");
            }
            // In file order, as `watchpost test-rules` replays them.
            let outcome = replay::replay(replay_config(), &rs, None);
            assert_eq!(outcome.readings, rs.len());
            let devices: std::collections::BTreeSet<_> = rs.iter().map(|r| &r.device).collect();
            assert_eq!(outcome.devices, devices.len(), "{text:?}");
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            let numbers: Vec<usize> = errors.iter().map(|e| error_line(e)).collect();
            assert!(
                numbers.windows(2).all(|w| w[0] < w[1]),
                "{errors:?} from {text:?}"
            );
            assert!(
                numbers.iter().all(|n| lines.contains(n)),
                "{errors:?} from {text:?}"
            );
        }
    }
}

/// `parse_expected` of one text: never panics; success gives one alert per non-blank line;
/// failure names each bad line once, in order, by its number.
pub fn expected(text: &str) {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, _)| i + 1)
        .collect();
    match replay::parse_expected(text) {
        Ok(es) => assert_eq!(es.len(), lines.len(), "{text:?}"),
        Err(errors) => {
            let numbers: Vec<usize> = errors.iter().map(|e| error_line(e)).collect();
            assert!(!numbers.is_empty());
            assert!(
                numbers.windows(2).all(|w| w[0] < w[1]),
                "{errors:?} from {text:?}"
            );
            assert!(
                numbers.iter().all(|n| lines.contains(n)),
                "{errors:?} from {text:?}"
            );
        }
    }
}
