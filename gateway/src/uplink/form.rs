//! What an outbox row becomes on the wire for each cloud: the topic and the payload, and for
//! Azure IoT Hub the SAS token the connection logs in with.
//!
//! - Plain (no profile, AWS IoT Core, HiveMQ Cloud, EMQX Cloud, MQTT 5): the alert document on
//!   `{topic_prefix}/alerts/{severity}/{device}/{rule}`, summaries on
//!   `{topic_prefix}/summaries`.
//! - Azure IoT Hub: the document as the message body on
//!   `devices/{device}/messages/events/{properties}`, where the properties are the alert's
//!   identifying fields (`$.mid` = the alert id, content type and encoding as system
//!   properties, then `kind`, `rule`, `device`, `metric`, `severity`, `state`, `gateway`), so
//!   that IoT Hub message routing can filter on them without reading the body.
//! - ThingsBoard: the gateway API's form, the alert as telemetry
//!   (`v1/gateway/telemetry`: `{"device":[{"ts":ms,"values":{...}}]}`) or attributes
//!   (`v1/gateway/attributes`: `{"device":{...}}`) of the device that raised it, with the keys
//!   `alert_{rule}` (1 raised, 0 cleared), `alert_{rule}_severity`, `alert_{rule}_value` and
//!   `alert_{rule}_id`; a summary as telemetry of the gateway device itself
//!   (`v1/devices/me/telemetry`, `{metric}_{count,devices,min,max,mean}`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value, json};

use crate::config::{Form, Secret};
use crate::store::OutboxEntry;

/// What URL encoding leaves as it is (RFC 3986's unreserved characters).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// Turns outbox rows into topics and payloads.
#[derive(Debug, Clone)]
pub(super) struct Shaper {
    pub form: Form,
    pub prefix: String,
    pub client_id: String,
}

impl Shaper {
    /// The topic and payload of `entry` on the wire.
    pub(super) fn shape(&self, entry: &OutboxEntry) -> (String, Bytes) {
        match &self.form {
            Form::Plain => (
                format!("{}/{}", self.prefix, entry.topic),
                entry.payload.clone(),
            ),
            Form::Azure { .. } => (
                format!(
                    "devices/{}/messages/events/{}",
                    self.client_id,
                    azure_properties(entry)
                ),
                entry.payload.clone(),
            ),
            Form::Thingsboard { attributes } => thingsboard(entry, *attributes),
        }
    }
}

fn document(entry: &OutboxEntry) -> Map<String, Value> {
    match serde_json::from_slice(&entry.payload) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

fn is_alert(entry: &OutboxEntry) -> bool {
    entry.topic.starts_with("alerts/")
}

/// Azure IoT Hub's property bag: `key=value&...`, URL-encoded.
fn azure_properties(entry: &OutboxEntry) -> String {
    let doc = document(entry);
    let mut bag = vec![
        format!("$.mid={}", encode(&entry.id)),
        "$.ct=application%2Fjson".to_owned(),
        "$.ce=utf-8".to_owned(),
        format!("kind={}", if is_alert(entry) { "alert" } else { "summary" }),
    ];
    for key in ["rule", "device", "metric", "severity", "state", "gateway"] {
        if let Some(Value::String(v)) = doc.get(key) {
            bag.push(format!("{key}={}", encode(v)));
        }
    }
    bag.join("&")
}

/// Milliseconds since the epoch of an RFC 3339 time, as the alert documents write them.
fn millis(text: Option<&Value>) -> u64 {
    text.and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn thingsboard(entry: &OutboxEntry, attributes: bool) -> (String, Bytes) {
    let doc = document(entry);
    if !is_alert(entry) {
        // A summary: telemetry of the gateway device itself.
        let mut values = Map::new();
        if let Some(Value::Object(metrics)) = doc.get("metrics") {
            for (metric, figures) in metrics {
                if let Value::Object(figures) = figures {
                    for (name, v) in figures {
                        values.insert(format!("{metric}_{name}"), v.clone());
                    }
                }
            }
        }
        let body = json!({ "ts": millis(doc.get("to")), "values": values });
        return (
            "v1/devices/me/telemetry".into(),
            Bytes::from(body.to_string()),
        );
    }
    let text = |key: &str| doc.get(key).and_then(Value::as_str).unwrap_or_default();
    let rule = text("rule");
    let mut values = Map::new();
    values.insert(
        format!("alert_{rule}"),
        json!(u8::from(text("state") == "raised")),
    );
    values.insert(format!("alert_{rule}_severity"), json!(text("severity")));
    if let Some(v) = doc.get("value") {
        values.insert(format!("alert_{rule}_value"), v.clone());
    }
    values.insert(format!("alert_{rule}_id"), json!(entry.id));
    let device = text("device").to_owned();
    if attributes {
        let body = json!({ device: values });
        (
            "v1/gateway/attributes".into(),
            Bytes::from(body.to_string()),
        )
    } else {
        let body = json!({ device: [{ "ts": millis(doc.get("at")), "values": values }] });
        ("v1/gateway/telemetry".into(), Bytes::from(body.to_string()))
    }
}

/// An Azure IoT Hub SAS token for `{host}/devices/{device}` that expires at `expiry` (seconds
/// since the epoch): `SharedAccessSignature sr=...&sig=...&se=...`, signed with HMAC-SHA256 of
/// the URL-encoded resource, a newline and the expiry, under the device's key.
pub(super) fn sas_token(host: &str, device: &str, key: &[u8], expiry: u64) -> String {
    let resource = encode(&format!("{host}/devices/{device}"));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let signature = ring::hmac::sign(&key, format!("{resource}\n{expiry}").as_bytes());
    use base64::Engine as _;
    let signature = base64::engine::general_purpose::STANDARD.encode(signature.as_ref());
    format!(
        "SharedAccessSignature sr={resource}&sig={}&se={expiry}",
        encode(&signature)
    )
}

/// Makes the SAS tokens of one device.
#[derive(Clone)]
pub(super) struct Sas {
    pub host: String,
    pub device: String,
    pub key: Vec<u8>,
    pub ttl: Duration,
}

impl Sas {
    pub(super) fn new(host: &str, device: &str, key: &Secret, ttl: Duration) -> Option<Sas> {
        Some(Sas {
            host: host.to_owned(),
            device: device.to_owned(),
            key: crate::config::base64_decode(key.expose())?,
            ttl,
        })
    }

    /// A token valid for `ttl` from now.
    pub(super) fn token(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        sas_token(
            &self.host,
            &self.device,
            &self.key,
            (now + self.ttl).as_secs(),
        )
    }

    /// When a token made now should be replaced: at four fifths of its life.
    pub(super) fn renew_after(&self) -> Duration {
        self.ttl * 4 / 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> OutboxEntry {
        OutboxEntry {
            id: "site-17:boiler-1:overheat:1795284345123".into(),
            topic: "alerts/critical/boiler-1/overheat".into(),
            payload: Bytes::from_static(
                br#"{"id":"site-17:boiler-1:overheat:1795284345123","rule":"overheat","device":"boiler-1","metric":"temperature","severity":"critical","state":"raised","value":95.2,"threshold":90.0,"since":"2026-11-21T18:05:45.123Z","at":"2026-11-21T18:05:55.130Z","gateway":"site-17"}"#,
            ),
            retain: true,
        }
    }

    fn shaper(form: Form) -> Shaper {
        Shaper {
            form,
            prefix: "site-17".into(),
            client_id: "gw 1".into(),
        }
    }

    #[test]
    fn azure_takes_the_alert_fields_as_properties_of_the_events_topic() {
        let form = Form::Azure {
            key: None,
            token_ttl: Duration::from_secs(3600),
        };
        let (topic, payload) = shaper(form).shape(&alert());
        assert_eq!(
            topic,
            "devices/gw 1/messages/events/$.mid=site-17%3Aboiler-1%3Aoverheat%3A1795284345123&$.ct=application%2Fjson&$.ce=utf-8&kind=alert&rule=overheat&device=boiler-1&metric=temperature&severity=critical&state=raised&gateway=site-17"
        );
        assert_eq!(payload, alert().payload, "the body is the document");
    }

    #[test]
    fn thingsboard_gets_the_alert_as_telemetry_or_attributes_of_its_device() {
        let (topic, payload) = shaper(Form::Thingsboard { attributes: false }).shape(&alert());
        assert_eq!(topic, "v1/gateway/telemetry");
        let body: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            body,
            json!({"boiler-1": [{"ts": 1795284355130u64, "values": {
                "alert_overheat": 1, "alert_overheat_severity": "critical",
                "alert_overheat_value": 95.2,
                "alert_overheat_id": "site-17:boiler-1:overheat:1795284345123"}}]})
        );
        let (topic, payload) = shaper(Form::Thingsboard { attributes: true }).shape(&alert());
        assert_eq!(topic, "v1/gateway/attributes");
        let body: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(body["boiler-1"]["alert_overheat"], json!(1));
    }

    #[test]
    fn a_sas_token_is_signed_as_azure_documents_it() {
        // Worked independently: HMAC-SHA256 under the key "secret-key" (base64
        // c2VjcmV0LWtleQ==) of "hub.azure-devices.net%2Fdevices%2Fdev-1\n1800000000".
        let token = sas_token(
            "hub.azure-devices.net",
            "dev-1",
            b"secret-key",
            1_800_000_000,
        );
        assert!(
            token.starts_with(
                "SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fdev-1&sig="
            ),
            "{token}"
        );
        assert!(token.ends_with("&se=1800000000"), "{token}");
        let sig = token
            .split("&sig=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .unwrap();
        let expected = {
            use base64::Engine as _;
            use sha2::Digest as _;
            // HMAC by its definition (RFC 2104), with SHA-256, to check ring's use here.
            let key = b"secret-key";
            let mut k = [0u8; 64];
            k[..key.len()].copy_from_slice(key);
            let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
            let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
            let h1 = sha2::Sha256::new()
                .chain_update(&inner)
                .chain_update(b"hub.azure-devices.net%2Fdevices%2Fdev-1\n1800000000")
                .finalize();
            let h2 = sha2::Sha256::new()
                .chain_update(&outer)
                .chain_update(h1)
                .finalize();
            encode(&base64::engine::general_purpose::STANDARD.encode(h2))
        };
        assert_eq!(sig, expected);
    }
}
