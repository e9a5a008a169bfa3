//! Foreign fleets: topic layouts of other products mapped onto readings by configuration, not
//! code. Pure, no I/O.
//!
//! A source names a topic pattern with `{device}` (and optionally `{metric}`) placeholders and
//! how to read the payload:
//!
//! | product | topic | payload | source |
//! |---|---|---|---|
//! | Tasmota | `tele/{device}/SENSOR` | JSON with nested objects | `payload = "json"`, optional `metrics` map of paths |
//! | ESPHome | `{device}/sensor/{metric}/state` | a plain number | `payload = "number"` |
//! | Shelly (Gen1) | `shellies/{device}/sensor/{metric}` | a plain number | `payload = "number"` |
//! | Shelly (Gen2+) | `{device}/status/temperature:0` | JSON `{"id":0,"tC":21.5,...}` | `payload = "json"`, `metrics = { tC = "temperature" }` |
//!
//! A JSON payload gives one reading per numeric leaf, named by its path (`AM2301.Temperature`)
//! or, if the source has a `metrics` map, only the mapped leaves under their new names. The
//! readings then go through loss accounting, rules and history like native ones, under
//! `sensors/{device}/{metric}`. A name that cannot be a metric there (empty, holding `/`, `+`
//! or `#`, or the reserved `status` or `seq`: [`check_metric_name`]) is not a reading: a
//! number under such a key, or such a `{metric}` level, is rejected with the reason, as the
//! native decoder rejects such keys.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::codec::{DecodeError, Limits, Readings, Rejected, check_metric_name};

/// How a source's payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A plain number.
    Number,
    /// A JSON object whose numeric leaves are readings.
    Json,
}

/// One level of a source's topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Any,
    Device,
    Metric,
}

/// A checked `[[source]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Name, for logs.
    pub name: String,
    levels: Vec<Level>,
    /// How the payload is read.
    pub payload: Payload,
    /// JSON path → metric name; `None` takes every numeric leaf under its path.
    pub metrics: Option<BTreeMap<String, String>>,
    /// The metric of a number payload whose topic has no `{metric}`.
    pub metric: Option<String>,
}

/// Why a source pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// No `{device}` level, or more than one.
    #[error("the topic needs exactly one {{device}} level")]
    Device,
    /// More than one `{metric}` level.
    #[error("the topic may have at most one {{metric}} level")]
    Metric,
    /// A level mixes a placeholder with text, or uses `#`.
    #[error(
        "a level is either text, `+`, {{device}} or {{metric}}; `#` and partial placeholders are not supported"
    )]
    Level,
    /// The pattern would take over the native `sensors/` topics.
    #[error("sources cannot start with `sensors/`: that is where native readings arrive")]
    Native,
}

impl Source {
    /// Checks a topic pattern such as `tele/{device}/SENSOR`.
    pub fn new(
        name: &str,
        topic: &str,
        payload: Payload,
        metrics: Option<BTreeMap<String, String>>,
        metric: Option<String>,
    ) -> Result<Source, PatternError> {
        let levels: Vec<Level> = topic
            .split('/')
            .map(|l| match l {
                "{device}" => Ok(Level::Device),
                "{metric}" => Ok(Level::Metric),
                "+" => Ok(Level::Any),
                _ if l.contains(['{', '}', '#', '+']) || l.is_empty() => Err(PatternError::Level),
                _ => Ok(Level::Literal(l.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        if levels.iter().filter(|l| **l == Level::Device).count() != 1 {
            return Err(PatternError::Device);
        }
        if levels.iter().filter(|l| **l == Level::Metric).count() > 1 {
            return Err(PatternError::Metric);
        }
        if matches!(levels.first(), Some(Level::Literal(l)) if l == crate::codec::TOPIC_ROOT) {
            return Err(PatternError::Native);
        }
        Ok(Source {
            name: name.to_owned(),
            levels,
            payload,
            metrics,
            metric,
        })
    }

    /// True if the topic names the metric (`{metric}`).
    pub fn has_metric_level(&self) -> bool {
        self.levels.contains(&Level::Metric)
    }

    /// The MQTT filter to subscribe to.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                _ => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// True if `topic` is one of this source's.
    pub fn matches(&self, topic: &str) -> bool {
        self.captures(topic).is_some()
    }

    /// The device a topic of this source belongs to, if the topic matches.
    pub fn device_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.captures(topic)
            .map(|(device, _)| device)
            .filter(|d| !d.is_empty())
    }

    /// Device and metric from `topic`, if it matches the pattern.
    fn captures<'a>(&self, topic: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let mut device = None;
        let mut metric = None;
        let mut parts = topic.split('/');
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(l) if l != part => return None,
                Level::Device => device = Some(part),
                Level::Metric => metric = Some(part),
                _ => {}
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((device?, metric))
    }

    /// Readings from one message; `None` if the topic is not this source's.
    pub fn decode<'a>(
        &self,
        topic: &'a str,
        payload: &'a [u8],
        limits: Limits,
    ) -> Option<Result<Readings<'a>, Rejected<'a>>> {
        let (device, metric) = self.captures(topic)?;
        Some(self.decode_captured(device, metric, payload, limits))
    }

    fn decode_captured<'a>(
        &self,
        device: &'a str,
        metric: Option<&'a str>,
        payload: &'a [u8],
        limits: Limits,
    ) -> Result<Readings<'a>, Rejected<'a>> {
        let reject = |error| Rejected {
            device: Some(device),
            error,
        };
        if device.is_empty() {
            return Err(Rejected {
                device: None,
                error: DecodeError::NoDevice,
            });
        }
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
            device,
            seq: None,
            values: Vec::new(),
            rejected: Vec::new(),
        };
        match self.payload {
            Payload::Number => {
                let name: Cow<'a, str> = match (metric, &self.metric) {
                    (Some(m), _) => Cow::Borrowed(m),
                    (None, Some(m)) => Cow::Owned(m.clone()),
                    (None, None) => return Err(reject(DecodeError::NoMetric)),
                };
                if name.is_empty() {
                    return Err(reject(DecodeError::NoMetric));
                }
                check_metric_name(&name).map_err(reject)?;
                let value: f64 = text.parse().map_err(|_| reject(DecodeError::NotANumber))?;
                if !value.is_finite() {
                    return Err(reject(DecodeError::NotFinite));
                }
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
                for (path, value) in leaves {
                    let name = match &self.metrics {
                        Some(map) => match map.get(&path) {
                            Some(m) => m.clone(),
                            None => continue,
                        },
                        None => path,
                    };
                    // Text, booleans and nulls are the product's own business, unless mapped.
                    if value.is_none() && self.metrics.is_none() {
                        continue;
                    }
                    let name = Cow::Owned(name);
                    if let Err(e) = check_metric_name(&name) {
                        readings.rejected.push((name, e));
                        continue;
                    }
                    match value {
                        Some(v) if v.is_finite() => readings.values.push((name, v)),
                        Some(_) => readings.rejected.push((name, DecodeError::NotFinite)),
                        None => readings.rejected.push((name, DecodeError::NotNumeric)),
                    }
                }
                if readings.values.is_empty() && readings.rejected.is_empty() {
                    return Err(reject(DecodeError::NoReadings));
                }
            }
        }
        Ok(readings)
    }
}

/// Every leaf of `value` with its dotted path; numbers as `Some`, everything else as `None`.
fn flatten(value: &serde_json::Value, path: &mut String, out: &mut Vec<(String, Option<f64>)>) {
    match value {
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
        }
        serde_json::Value::Number(n) => out.push((path.clone(), n.as_f64())),
        serde_json::Value::Array(_) => {}
        _ => out.push((path.clone(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(r: &Readings<'_>) -> Vec<(String, f64)> {
        r.values.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn patterns_are_checked_and_become_filters() {
        let esphome = Source::new(
            "e",
            "{device}/sensor/{metric}/state",
            Payload::Number,
            None,
            None,
        )
        .unwrap();
        assert_eq!(esphome.filter(), "+/sensor/+/state");
        for (topic, error) in [
            ("tele/SENSOR", PatternError::Device),
            ("{device}/{device}", PatternError::Device),
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
        let s = Source::new("tasmota", "tele/{device}/SENSOR", Payload::Json, None, None).unwrap();
        let payload = br#"{"Time":"2026-11-21T18:05:45","AM2301":{"Temperature":21.5,"Humidity":40.1},"TempUnit":"C"}"#;
        let r = s
            .decode("tele/kitchen/SENSOR", payload, Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(r.device, "kitchen");
        assert_eq!(
            values(&r),
            [
                ("AM2301.Humidity".into(), 40.1),
                ("AM2301.Temperature".into(), 21.5)
            ]
        );
        assert!(r.rejected.is_empty(), "text fields are not errors");
        assert!(
            s.decode("tele/kitchen/STATE", payload, Limits::default())
                .is_none()
        );
    }

    #[test]
    fn json_keys_that_cannot_be_metrics_are_rejected_and_the_rest_kept() {
        let s = Source::new("tasmota", "tele/{device}/SENSOR", Payload::Json, None, None).unwrap();
        let payload = br##"{"":1,"a/b":2,"+":3,"#":4,"status":5,"seq":6,"x":{"":7,"y/z":8},
            "AM2301":{"Temperature":21.5},"status.ok":9,"note":{"":"text is ignored"}}"##;
        let r = s
            .decode("tele/k/SENSOR", payload, Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            values(&r),
            [
                ("AM2301.Temperature".into(), 21.5),
                ("status.ok".into(), 9.0),
                ("x.".into(), 7.0)
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
                ("seq", &DecodeError::ReservedSeq),
                ("status", &DecodeError::ReservedMetric),
                ("x.y/z", &DecodeError::BadMetricName),
            ]
        );
    }

    #[test]
    fn a_json_message_with_no_usable_name_is_only_rejections() {
        let s = Source::new("tasmota", "tele/{device}/SENSOR", Payload::Json, None, None).unwrap();
        // Every number is under an unusable key: each is a decode error, none a reading.
        let r = s
            .decode(
                "tele/k/SENSOR",
                br#"{"status":1,"Time":"x"}"#,
                Limits::default(),
            )
            .unwrap()
            .unwrap();
        assert!(r.values.is_empty());
        assert_eq!(
            r.rejected,
            [(Cow::Borrowed("status"), DecodeError::ReservedMetric)]
        );
        // No number at all, whatever the keys: nothing to read.
        let e = s
            .decode(
                "tele/k/SENSOR",
                br#"{"":"x","seq":null}"#,
                Limits::default(),
            )
            .unwrap()
            .unwrap_err();
        assert_eq!((e.device, e.error), (Some("k"), DecodeError::NoReadings));
    }

    #[test]
    fn number_sources_refuse_reserved_metric_levels() {
        let s = Source::new(
            "esphome",
            "{device}/sensor/{metric}/state",
            Payload::Number,
            None,
            None,
        )
        .unwrap();
        for (topic, error) in [
            ("node/sensor/status/state", DecodeError::ReservedMetric),
            ("node/sensor/seq/state", DecodeError::ReservedSeq),
            ("node/sensor/a+b/state", DecodeError::BadMetricName),
            ("node/sensor//state", DecodeError::NoMetric),
        ] {
            let e = s
                .decode(topic, b"1", Limits::default())
                .unwrap()
                .unwrap_err();
            assert_eq!((e.device, e.error), (Some("node"), error), "{topic}");
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
        let r = s
            .decode(
                "shellyplusht-1/status/temperature:0",
                br#"{"id":0,"tC":21.5,"tF":70.7}"#,
                Limits::default(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(values(&r), [("temperature".into(), 21.5)]);
    }

    #[test]
    fn plain_numbers_and_errors() {
        let s = Source::new(
            "esphome",
            "{device}/sensor/{metric}/state",
            Payload::Number,
            None,
            None,
        )
        .unwrap();
        let r = s
            .decode(
                "garden/sensor/soil_moisture/state",
                b"41.2",
                Limits::default(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(values(&r), [("soil_moisture".into(), 41.2)]);
        let bad = s
            .decode(
                "garden/sensor/soil_moisture/state",
                b"unavailable",
                Limits::default(),
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(
            (bad.device, bad.error),
            (Some("garden"), DecodeError::NotANumber)
        );
        let fixed = Source::new(
            "relay",
            "shellies/{device}/relay/+/power",
            Payload::Number,
            None,
            Some("power".into()),
        )
        .unwrap();
        let r = fixed
            .decode("shellies/plug-1/relay/0/power", b"12.5", Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(values(&r), [("power".into(), 12.5)]);
    }
}
