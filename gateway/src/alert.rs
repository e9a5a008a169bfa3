//! The alert document: what operators and cloud services receive on `alerts/...`.
//!
//! ```json
//! {"id":"site-17:boiler-1:overheat:1732212345123","rule":"overheat","device":"boiler-1",
//!  "metric":"temperature","severity":"critical","state":"raised","value":95.2,
//!  "threshold":90.0,"since":"2026-11-21T18:05:45.123Z","at":"2026-11-21T18:05:55.130Z",
//!  "gateway":"site-17"}
//! ```
//!
//! `id` names one raise–clear episode: the raised and the cleared document share it, so a
//! consumer can drop the duplicates that at-least-once delivery brings.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::rules::{AlertState, Millis, Rule, Severity, Transition};
use crate::value::Value;

/// First topic level of local alerts.
pub const TOPIC_ROOT: &str = "alerts";

/// One alert transition, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertDoc {
    /// `{gateway}:{device}:{rule}:{since in ms}`: stable for one episode.
    pub id: String,
    /// Rule name.
    pub rule: String,
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Severity of the rule.
    pub severity: Severity,
    /// Raised or cleared.
    pub state: AlertState,
    /// The reading that caused the transition: a number, or a state (`true`, `"open"`).
    pub value: Value,
    /// The bound that was crossed; absent for state rules, which have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// When the episode began, RFC 3339 UTC with milliseconds.
    pub since: String,
    /// When this transition happened, RFC 3339 UTC with milliseconds.
    pub at: String,
    /// Gateway (site) id.
    pub gateway: String,
    /// For a reminder that the alert is still raised (`renotify`): how many so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeat: u32,
    /// The rule's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl AlertDoc {
    /// Builds the document for `transition` of `rule` on one device and metric.
    pub fn new(gateway: &str, rule: &Rule, device: &str, metric: &str, t: &Transition) -> Self {
        Self {
            id: format!("{gateway}:{device}:{}:{}", rule.name, t.since),
            rule: rule.name.clone(),
            device: device.to_owned(),
            metric: metric.to_owned(),
            severity: rule.severity,
            state: t.state,
            value: t.value.clone(),
            threshold: t.threshold,
            since: rfc3339(t.since),
            at: rfc3339(t.at),
            gateway: gateway.to_owned(),
            repeat: t.repeat,
            labels: rule.labels.clone(),
        }
    }

    /// `alerts/{severity}/{device}/{rule}`: the topic relative to any prefix.
    pub fn topic(&self) -> String {
        topic(self.severity, &self.device, &self.rule)
    }

    /// The document as compact JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an alert document always serializes")
    }
}

/// `alerts/{severity}/{device}/{rule}`: where the alerts of `rule` on `device` are published
/// (retained), relative to any prefix.
pub fn topic(severity: Severity, device: &str, rule: &str) -> String {
    format!("{TOPIC_ROOT}/{}/{device}/{rule}", severity.as_str())
}

/// The last instant RFC 3339 can write, 9999-12-31T23:59:59.999Z, in milliseconds since the
/// epoch: its years have four digits.
pub const LAST_RFC3339_MS: Millis = 253_402_300_799_999;

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds. A time after
/// 9999-12-31T23:59:59.999Z (a clock set far ahead, a corrupt row) is written as that instant,
/// so that the field stays a time every consumer can parse; this never panics.
pub fn rfc3339(ms: Millis) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.min(LAST_RFC3339_MS));
    humantime::format_rfc3339_millis(at).to_string()
}

/// The wall clock in milliseconds since the epoch (0 if the clock is before 1970).
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Kind, Threshold};
    use crate::topic::TopicFilter;

    fn overheat(labels: BTreeMap<String, String>) -> Rule {
        Rule {
            name: "overheat".into(),
            filter: TopicFilter::new("sensors/+/temperature").unwrap(),
            kind: Kind::Threshold(Threshold {
                above: Some(90.0),
                ..Threshold::default()
            }),
            hold: Duration::from_secs(10),
            severity: Severity::Critical,
            renotify: None,
            cooldown: None,
            forward: None,
            labels,
        }
    }

    fn raised(repeat: u32) -> Transition {
        Transition {
            state: AlertState::Raised,
            since: 1_795_284_345_123,
            at: 1_795_284_355_130,
            value: Value::Number(95.2),
            threshold: Some(90.0),
            repeat,
        }
    }

    #[test]
    fn document_matches_the_design() {
        let doc = AlertDoc::new(
            "site-17",
            &overheat(BTreeMap::new()),
            "boiler-1",
            "temperature",
            &raised(0),
        );
        assert_eq!(doc.topic(), "alerts/critical/boiler-1/overheat");
        let json: serde_json::Value = serde_json::from_slice(&doc.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "site-17:boiler-1:overheat:1795284345123", "rule": "overheat",
                "device": "boiler-1", "metric": "temperature", "severity": "critical",
                "state": "raised", "value": 95.2, "threshold": 90.0,
                "since": "2026-11-21T18:05:45.123Z", "at": "2026-11-21T18:05:55.130Z",
                "gateway": "site-17"
            })
        );
    }

    #[test]
    fn a_numeric_document_is_byte_for_byte_what_it_always_was() {
        let doc = AlertDoc::new(
            "site-17",
            &overheat(BTreeMap::new()),
            "boiler-1",
            "temperature",
            &raised(0),
        );
        assert_eq!(
            String::from_utf8(doc.to_json()).unwrap(),
            r#"{"id":"site-17:boiler-1:overheat:1795284345123","rule":"overheat","device":"boiler-1","metric":"temperature","severity":"critical","state":"raised","value":95.2,"threshold":90.0,"since":"2026-11-21T18:05:45.123Z","at":"2026-11-21T18:05:55.130Z","gateway":"site-17"}"#
        );
    }

    #[test]
    fn a_state_document_carries_the_state_and_no_threshold() {
        let mut rule = overheat(BTreeMap::new());
        rule.name = "leak".into();
        for (value, json) in [
            (Value::Bool(true), "true"),
            (Value::Text("open".into()), r#""open""#),
        ] {
            let t = Transition {
                value,
                threshold: None,
                ..raised(0)
            };
            let doc = AlertDoc::new("site-17", &rule, "basement", "water_leak", &t);
            let text = String::from_utf8(doc.to_json()).unwrap();
            assert!(
                text.contains(&format!(r#""state":"raised","value":{json},"since""#)),
                "{text}"
            );
            let back: AlertDoc = serde_json::from_str(&text).unwrap();
            assert_eq!(back, doc);
        }
    }

    #[test]
    fn times_after_year_9999_are_written_as_its_last_instant() {
        // humantime refuses years past 9999 with fmt::Error, and `to_string` would panic.
        let last = "9999-12-31T23:59:59.999Z";
        for ms in [
            LAST_RFC3339_MS,
            LAST_RFC3339_MS + 1,
            1_000_000_000_000_000,
            u64::MAX,
        ] {
            assert_eq!(rfc3339(ms), last, "{ms}");
        }
        assert_eq!(rfc3339(LAST_RFC3339_MS - 999), "9999-12-31T23:59:59.000Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_transition_after_year_9999_still_makes_a_document() {
        let t = Transition {
            since: 795_284_952_840_250,
            at: u64::MAX,
            ..raised(0)
        };
        let doc = AlertDoc::new(
            "site-17",
            &overheat(BTreeMap::new()),
            "boiler-1",
            "temperature",
            &t,
        );
        assert_eq!(
            (doc.since.as_str(), doc.at.as_str()),
            ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z")
        );
        assert_eq!(doc.id, "site-17:boiler-1:overheat:795284952840250");
    }

    #[test]
    fn labels_and_repeats_are_added_only_when_there_are_some() {
        let labels = BTreeMap::from([("team".to_owned(), "boilers".to_owned())]);
        let doc = AlertDoc::new(
            "site-17",
            &overheat(labels),
            "boiler-1",
            "temperature",
            &raised(2),
        );
        let json: serde_json::Value = serde_json::from_slice(&doc.to_json()).unwrap();
        assert_eq!(json["labels"], serde_json::json!({"team": "boilers"}));
        assert_eq!(json["repeat"], 2);
        assert_eq!(serde_json::from_value::<AlertDoc>(json).unwrap(), doc);
    }
}
